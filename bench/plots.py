"""The benchmark plots (matplotlib PNGs under ``docs/images/``), drawn from the saved results only."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_plots"]


def _figure(width: float = 7.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=110)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def _core_dice(results: dict, folder: Path) -> list[Path]:
    core = results.get("core") or {}
    hip = core.get("hippocampus")
    if not hip or not hip.get("box3d_dice_per_case"):
        return []
    plt, fig, ax = _figure()
    names = [n.replace("hippocampus_", "").replace(".nii.gz", "") for n in hip["case_names"]]
    ax.plot(names, hip["box3d_dice_per_case"], "o-", label=f"default (mean {hip['box3d_dice_mean']:.3f})")
    for run in core.get("history", []):
        other = run.get("hippocampus") or {}
        if other.get("case_names") == hip["case_names"] and other.get("box3d_dice_per_case"):
            ax.plot(names, other["box3d_dice_per_case"], "s--", label=f"{run['label']} (mean {other['box3d_dice_mean']:.3f})")
    ax.set_xlabel("hippocampus case")
    ax.set_ylabel("Dice")
    ax.set_title("One 3D box per case (the label's bounding box)")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.legend(fontsize=8)
    return [_save(plt, fig, folder / "core_hippocampus_dice.png")]


def _core_latency(results: dict, folder: Path) -> list[Path]:
    core = results.get("core") or {}
    run = next((r for r in [core] + core.get("history", []) if (r.get("hc18") or {}).get("encoder_ms_each")), None)
    if run is None:
        return []
    hc = run["hc18"]
    plt, fig, ax = _figure(6.0, 3.0)
    series = {"encoder (new slice)": hc["encoder_ms_each"], "box prompt": hc["decoder_ms_each"],
              "click prompt": hc["click_ms_each"]}
    ax.boxplot(list(series.values()), vert=False)
    ax.set_yticks(range(1, len(series) + 1), list(series))
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("milliseconds (log scale)")
    ax.set_title(f"Latency per call, {hc['images']} HC18 images")
    return [_save(plt, fig, folder / "core_latency.png")]


def _finetune_dice(results: dict, folder: Path) -> list[Path]:
    run = results.get("finetune") or {}
    parts = [p for p in ("hippocampus", "hc18") if (run.get(p) or {}).get("cases")]
    if not parts:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(parts), figsize=(4.0 * len(parts), 3.4), dpi=110, squeeze=False)
    for ax, part in zip(axes[0], parts):
        cases = run[part]["cases"]
        keys = [("zero_shot_box", "zero-shot box"), ("adapted_box", "adapted box"), ("adapted_auto", "adapted automatic")]
        ax.boxplot([[c[k] for c in cases] for k, _ in keys], showmeans=True)
        ax.set_xticks(range(1, len(keys) + 1), [label for _, label in keys], fontsize=8)
        ax.set_ylabel("Dice per test case")
        ax.set_title(f"{part}: {len(cases)} test cases", fontsize=9)
    return [_save(plt, fig, folder / "finetune_dice.png")]


def write_plots(results: dict, folder: Path) -> list[Path]:
    """Write every plot the results allow; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    return _core_dice(results, folder) + _core_latency(results, folder) + _finetune_dice(results, folder)
