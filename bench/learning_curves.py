"""Learning curves: adapted LiteMedSAM against a from-scratch MONAI U-Net, and the correction loop.

For hippocampus MRI (3D) and HC18 ultrasound (2D): adapted automatic and box Dice against the
number of training cases (drawn per seed from a fixed training pool; the same test cases for
every point), the MONAI baseline trained on the same cases for the adapter's training time, the
zero-shot box figure, training time and process peak memory per point. Then the correction
loop: start from ``loop_start`` cases, segment a pool of unseen cases automatically, add the
``loop_add`` worst with their labels as the user's correction, continue the adapter
(``continue_adapter``, the parent's cases replayed), repeat; test Dice and the first cases' Dice
(the forgetting check) after each round and, outside ``--quick``, the test Dice of an adapter
trained on the same cases at once.

Usage: python -m bench.learning_curves [--quick] [--parts hippocampus,hc18] [-o FILE]
(``--quick``: few steps, cases and test cases, one seed; labelled ``"quick": true``.)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from MedFMSegmentLib.files import atomic_write_text
from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.finetune.baseline import BaselineConfig, predict_baseline, train_baseline
from MedFMSegmentLib.finetune.continual import continue_adapter
from MedFMSegmentLib.finetune.trainer import FinetuneConfig, finetune
from MedFMSegmentLib.inference import SegmentationSession
from MedFMSegmentLib.inference.automatic import segment_automatic

from .common import machine, peak_rss_mb
from .data import DATA_DIR, hc18_split, hippocampus_split
from .finetune import box_dice

__all__ = ["main", "SETTINGS", "QUICK", "plot", "report_section", "summary_rows", "headline_rows", "merged_points",
           "engine_lines"]

RESULT = Path(__file__).resolve().parent / "results" / "learning_curves.json"
SETTINGS = {"sizes": [1, 3, 5, 10], "seeds": [0, 1, 2], "pool": 12, "test": {"hippocampus": 20, "hc18": 30},
            "steps": None, "embedding_budget": None, "loop_start": 3, "loop_add": 2, "loop_rounds": 3,
            "loop_candidates": 6, "forgetting_cases": 3, "loop_at_once": True}
QUICK = {"sizes": [1, 3], "seeds": [0], "pool": 5, "test": {"hippocampus": 1, "hc18": 3}, "steps": 30,
         "embedding_budget": 8, "loop_start": 3, "loop_add": 2, "loop_rounds": 1, "loop_candidates": 2,
         "forgetting_cases": 3, "loop_at_once": False}


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Embeddings:
    """Base-encoder embeddings of test images, computed once: a frozen-encoder adapter decodes them."""

    def __init__(self, base) -> None:
        self.base, self.store = base, {}

    def session(self, model, image) -> SegmentationSession:
        session = SegmentationSession(model, image, axis="axial")
        key = image.source
        if key not in self.store:
            s0 = SegmentationSession(self.base, image, axis="axial")
            s0.embed_slices(range(s0.num_slices))
            self.store[key] = [s0.embedding(i) for i in range(s0.num_slices)]
        for index, embedding in enumerate(self.store[key]):
            session.store_embedding(index, embedding)
        return session


def _dice(pred, label) -> float:
    return dice(pred, label.array != 0)


def _adapted_scores(model, cases, embeddings: _Embeddings, with_box: bool = True) -> dict:
    auto, box = [], []
    for image, label in cases:
        session = embeddings.session(model, image)
        auto.append(_dice(segment_automatic(session), label))
        if with_box:
            box.append(box_dice(session, label.array != 0))
    out = {"automatic": float(np.mean(auto)), "automatic_per_case": auto}
    if with_box:
        out["box"] = float(np.mean(box))
    return out


def _config(settings: dict, seed: int) -> FinetuneConfig:
    config = FinetuneConfig(device="cpu", encoder="frozen", seed=seed, steps=settings["steps"])
    return config if settings["embedding_budget"] is None else replace(config, embedding_budget=settings["embedding_budget"])


def _progress(started: float):
    def report(r: dict) -> None:
        if r.get("stage") == "embedding" and r["done"] in (1, r["total"]):
            _log(f"  embedded {r['done']}/{r['total']} at {time.monotonic() - started:.0f} s")
        elif r.get("stage") == "automatic_net" and r["done"] in (0, r["total"]):
            _log(f"  U-Net candidate {r['done']}/{r['total']} s at {time.monotonic() - started:.0f} s")
        elif r.get("stage") is None and r["step"] in (1, r["steps"]):
            _log(f"  step {r['step']}/{r['steps']} at {time.monotonic() - started:.0f} s")
    return report


def _point(train, test, settings, seed, embeddings) -> tuple[dict, object, dict]:
    started = time.monotonic()
    model, metadata = finetune(train, _config(settings, seed), progress=_progress(started))
    seconds = time.monotonic() - started
    _log(f"  adapter trained on {len(train)} cases in {seconds:.0f} s")
    adapted = _adapted_scores(model, test, embeddings)
    rss = peak_rss_mb()
    _log(f"  adapter scored: {adapted['automatic']:.3f} automatic, {adapted['box']:.3f} box")
    own_decoder = None
    if model.prompt_decoder is not None:  # box prompts keep the base decoder: what the adapted one would give
        kept, model.prompt_decoder = model.prompt_decoder, None
        own_decoder = _adapted_scores(model, test, embeddings)
        model.prompt_decoder = kept
        _log(f"  with the adapted decoder for boxes: {own_decoder['automatic']:.3f} automatic, "
             f"{own_decoder['box']:.3f} box")
    baseline = train_baseline(train, BaselineConfig(seconds=seconds, seed=seed))
    scratch = [_dice(predict_baseline(baseline, image), label) for image, label in test]
    row = {"cases": len(train), "seed": seed, "training_seconds": round(seconds, 1),
           "steps": metadata["steps"], "adapted_automatic": adapted["automatic"], "adapted_box": adapted["box"],
           "box_prompts": metadata["box_prompts"],
           "automatic_engine": metadata.get("automatic_engine"), "commit": machine().get("commit"),
           "adapted_decoder_box": own_decoder["box"] if own_decoder else adapted["box"],
           "baseline_dice": float(np.mean(scratch)), "baseline_steps": baseline.steps,
           "baseline_seconds": baseline.seconds, "process_peak_rss_mb": round(rss, 1)}
    return row, model, metadata


def _correction_loop(pool, test, settings, embeddings, folder: Path, start_point) -> list[dict]:
    """Start from ``loop_start`` pool cases (the learning curve's adapter for them, when it made
    one); each round add the ``loop_add`` worst automatic results with their labels."""
    start = settings["loop_start"]
    train, candidates = list(pool[:start]), list(pool[start:start + settings["loop_candidates"]])
    if start_point is not None:
        train, model, metadata = start_point
        ids = {id(c) for c in train}
        candidates = [c for c in pool if id(c) not in ids][:settings["loop_candidates"]]
    else:
        model, metadata = finetune(train, _config(settings, 0))
    first = train[:settings["forgetting_cases"]]
    adapter = folder / "round0"
    from MedFMSegmentLib.finetune.adapters import save_adapter

    save_adapter(model, adapter, metadata)
    rounds = [{"round": 0, "cases": len(train), "training_seconds": metadata["training_seconds"],
               "test": _adapted_scores(model, test, embeddings, with_box=False)["automatic"],
               "first_cases": _adapted_scores(model, first, embeddings, with_box=False)["automatic"]}]
    _log(f"correction round 0: {rounds[-1]}")
    for n in range(1, settings["loop_rounds"] + 1):
        if not candidates:
            break
        scores = _adapted_scores(model, candidates, embeddings, with_box=False)["automatic_per_case"]
        worst = [candidates[i] for i in np.argsort(scores)[:settings["loop_add"]]]
        candidates = [c for c in candidates if all(c is not w for w in worst)]
        child = folder / f"round{n}"
        overrides = {"device": "cpu"}
        if settings["steps"] is not None:
            overrides["steps"] = max(1, round(settings["steps"] * 0.4))
        if settings["embedding_budget"] is not None:
            overrides["embedding_budget"] = settings["embedding_budget"]
        model, metadata = continue_adapter(adapter, worst, child, **overrides)
        adapter = child
        train += worst
        rounds.append({"round": n, "cases": len(train), "added_automatic_dice": sorted(scores)[:len(worst)],
                       "training_seconds": metadata["training_seconds"],
                       "replayed": metadata["lineage"][-1]["cases_replayed"],
                       "test": _adapted_scores(model, test, embeddings, with_box=False)["automatic"],
                       "first_cases": _adapted_scores(model, first, embeddings, with_box=False)["automatic"]})
        rounds[-1]["first_cases_drop"] = round(rounds[0]["first_cases"] - rounds[-1]["first_cases"], 4)
        if settings.get("loop_at_once"):  # the same cases trained at once, for comparison
            at_once, _ = finetune(train, _config(settings, 0))
            rounds[-1]["test_trained_at_once"] = _adapted_scores(at_once, test, embeddings, with_box=False)["automatic"]
        _log(f"correction round {n}: {rounds[-1]}")
        print(f"correction round {n}: {len(train)} cases, test automatic Dice {rounds[-1]['test']:.3f}, "
              f"first cases {rounds[-1]['first_cases']:.3f}", flush=True)
    return rounds


def run_part(part: str, settings: dict, folder: Path, loop: bool) -> dict:
    from MedFMSegmentLib.loading import load_model

    split = hippocampus_split if part == "hippocampus" else hc18_split
    pool, test = split(settings["pool"], settings["test"][part])
    base = load_model(device="cpu")  # the accelerated encoder the frozen-encoder training uses too
    embeddings = _Embeddings(base)
    zero_shot = float(np.mean([box_dice(embeddings.session(base, image), label.array != 0) for image, label in test]))
    _log(f"{part} zero-shot box {zero_shot:.3f}")
    points, start_point = [], None
    for n in settings["sizes"]:
        for seed in settings["seeds"]:
            order = np.random.default_rng(seed).permutation(len(pool))
            train = [pool[i] for i in order[:n]]
            row, model, metadata = _point(train, test, settings, seed, embeddings)
            points.append(row)
            if n == settings["loop_start"] and start_point is None:
                start_point = (train, model, metadata)
            _log(f"{part} {row}")
    result = {"train_pool": len(pool), "test_cases": [Path(image.source).name for image, _ in test],
              "zero_shot_box": zero_shot, "points": points}
    if loop:
        result["correction_loop"] = _correction_loop(pool, test, settings, embeddings, folder / part,
                                                     start_point)
    return result


def plot(result: dict, output: Path) -> list[Path]:
    """Draw one learning-curve figure per part (Dice against training cases) as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for part in ("hippocampus", "hc18"):
        if part not in result:
            continue
        points = result[part]["points"]
        sizes = sorted({p["cases"] for p in points})
        figure, axes = plt.subplots(figsize=(5, 3.5))
        for key, name in (("adapted_automatic", "adapted, automatic"), ("adapted_box", "adapted, box"),
                          ("baseline_dice", "MONAI U-Net from scratch")):
            axes.plot(sizes, [np.mean([p[key] for p in points if p["cases"] == n]) for n in sizes], "o-", label=name)
        axes.axhline(result[part]["zero_shot_box"], linestyle="--", color="grey", label="zero-shot box")
        axes.set(xlabel="training cases", ylabel="Dice", title=part + (" (quick)" if result.get("quick") else ""))
        axes.legend(fontsize=8)
        path = output.with_name(f"{output.stem}_{part}.png")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


_PART_NAMES = {"hippocampus": ("Hippocampus MRI (3D)", "cases"), "hc18": ("HC18 ultrasound (2D)", "images")}


def _spread(values: list[float]) -> str:
    """Mean, with the range over seeds when there are several."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def summary_rows(part: dict) -> list[dict]:
    """One row per training-set size: means (and values) over the seeds run."""
    rows = []
    for n in sorted({p["cases"] for p in part["points"]}):
        points = [p for p in part["points"] if p["cases"] == n]
        rows.append({"cases": n, "seeds": len(points),
                     **{key: [p[key] for p in points] for key in
                        ("adapted_automatic", "adapted_box", "baseline_dice", "training_seconds", "baseline_steps",
                         "steps", "process_peak_rss_mb")}})
    return rows


def report_section(result: dict) -> list[str]:
    """The suite's part of ``docs/benchmarks.md`` (``python -m bench report``)."""
    from .report import _machine_line

    settings = result["settings"]
    quick = " **Quick run** (`--quick`: too few steps for automatic mode; checks the suite only)." if result.get("quick") else ""
    out = ["## learning_curves", "",
           f"`python -m bench learning_curves` ({_machine_line(result)}): {result['adapter']} against "
           f"{result['baseline']}, on training cases drawn per seed from a pool of {settings['pool']} (seeds "
           f"{', '.join(map(str, settings['seeds']))}); the same test cases for every point. Dice is per case, "
           f"averaged (3D Dice for volumes); with several seeds the range over seeds follows in brackets.{quick}", ""]
    for key in ("hippocampus", "hc18"):
        if key not in result:
            continue
        part = result[key]
        name, unit = _PART_NAMES[key]
        tests = len(part["test_cases"])
        own = part.get("machine")
        where = (f" Measured on {_machine_line({'machine': own})}, seeds "
                 f"{', '.join(map(str, (part.get('settings') or settings)['seeds']))}." if own and own != result.get("machine") else "")
        out += [f"**{name}**: {tests} test {unit if tests != 1 else unit[:-1]}; zero-shot box Dice "
                f"{part['zero_shot_box']:.3f}.{where}", "",
                f"| Training {unit} | Automatic after fine-tuning | Adapted, box | MONAI U-Net from scratch | Training (s) | "
                "Adapter / U-Net steps | Peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
        for row in summary_rows(part):
            out.append(f"| {row['cases']} | {_spread(row['adapted_automatic'])} | {_spread(row['adapted_box'])} | "
                       f"{_spread(row['baseline_dice'])} | {np.mean(row['training_seconds']):.0f} | "
                       f"{np.mean(row['steps']):.0f} / {np.mean(row['baseline_steps']):.0f} | "
                       f"{max(row['process_peak_rss_mb']):.0f} |")
        kept_base = [p for p in part["points"] if p.get("box_prompts") == "base"]
        if kept_base:
            out += ["", "Box prompts kept the base model's decoder (validation did not show the adapted one better "
                    "with boxes, or nothing validated it) at: " + "; ".join(
                        f"{p['cases']} {unit if p['cases'] != 1 else unit[:-1]}, seed {p['seed']} (the adapted decoder: "
                        f"box Dice {p['adapted_decoder_box']:.3f})" for p in kept_base) + "."]
        out += engine_lines(part, unit)
        loop, own_settings = part.get("correction_loop"), part.get("settings") or settings
        if loop:
            out += ["", f"Correction loop ({name}): each round adds the {own_settings['loop_add']} worst automatic "
                    f"results of {own_settings['loop_candidates']} unseen {unit} with their labels as the correction and "
                    f"continues the adapter (the parent's {unit} replayed); first {unit}: the first "
                    f"{own_settings['forgetting_cases']} "
                    f"training {unit} (the forgetting check).", "",
                    f"| Round | Training {unit} | Training (s) | Test, automatic | Same {unit} trained at once | "
                    f"First {unit} | Drop on first {unit} |", "|---|---|---|---|---|---|---|"]
            for r in loop:
                out.append(f"| {r['round']} | {r['cases']} | {r['training_seconds']:.0f} | {r['test']:.3f} | "
                           f"{_f(r.get('test_trained_at_once'))} | {r['first_cases']:.3f} | "
                           f"{_f(r.get('first_cases_drop'), 4)} |")
        plot_file = f"learning_curves_{key}.png"
        if (RESULT.parent / plot_file).is_file():
            out += ["", f"![{name} learning curve](../bench/results/{plot_file})"]
        out.append("")
    return out


def engine_lines(part: dict, unit: str) -> list[str]:
    """Which engine each point's automatic mode used (chosen on held-out volumes), and the points
    measured before that choice existed."""
    def point(p: dict) -> str:
        return f"{p['cases']} {unit if p['cases'] != 1 else unit[:-1]}, seed {p['seed']}"

    chosen = [p for p in part["points"] if (p.get("automatic_engine") or {}).get("unet_dice") is not None]
    older = [p for p in part["points"] if "automatic_engine" not in p]
    out = []
    if chosen:
        out += ["", "Automatic mode's engine, chosen on the held-out training volume(s) (the U-Net trained for the "
                "adapter's time on the other training volumes; both figures are held-out Dice): " + "; ".join(
                    f"{point(p)}: {'U-Net' if p['automatic_engine']['chosen'] == 'unet' else 'adapter'} "
                    f"({p['automatic_engine']['unet_dice']:.3f} U-Net, {p['automatic_engine']['adapter_dice']:.3f} "
                    "adapter)" for p in chosen) + ". Training (s) includes both trainings and the check."]
    if older and len(older) < len(part["points"]):
        out += ["", "Measured before fine-tuning chose automatic mode's engine (the adapter alone; commit "
                + ", ".join(sorted({str(p.get("commit")) for p in older})) + "): "
                + "; ".join(point(p) for p in older) + "."]
    return out


def headline_rows(result: dict) -> list[tuple[str, str, str]]:
    """README's rows (``python -m bench report``): per part, adapted automatic Dice against the
    from-scratch U-Net at each training-set size, and the correction loop's first and last round.
    None from a quick run."""
    from .report import hardware

    if result.get("quick"):
        return []
    rows = []
    for key in ("hippocampus", "hc18"):
        if key not in result:
            continue
        part, (name, unit) = result[key], _PART_NAMES[key]
        where = hardware({"machine": part.get("machine") or result.get("machine")})
        summary = summary_rows(part)
        sizes = "/".join(str(r["cases"]) for r in summary)
        counts = [r["seeds"] for r in summary]
        seeds = "" if len(set(counts)) == 1 else f" (means over {'/'.join(map(str, counts))} seeds)"
        engine = (" (the adapter, or its U-Net where held-out volumes chose it)"
                  if any((p.get("automatic_engine") or {}).get("unet_dice") is not None for p in part["points"]) else "")
        rows.append((f"Learning curve, {name.split(' (')[0]}, {sizes} training {unit}: automatic Dice after "
                     f"fine-tuning{engine} / MONAI U-Net from scratch (same training time)",
                     " / ".join(f"{np.mean(r['adapted_automatic']):.3f}" for r in summary) + " against "
                     + " / ".join(f"{np.mean(r['baseline_dice']):.3f}" for r in summary) + seeds, where))
        loop = part.get("correction_loop")
        if loop and len(loop) > 1:
            drop = max(r.get("first_cases_drop", 0.0) for r in loop[1:])
            rows.append((f"Correction loop, {name.split(' (')[0]}: {loop[0]['cases']} to {loop[-1]['cases']} {unit}, "
                         f"the worst automatic results corrected and added each round",
                         f"automatic Dice {loop[0]['test']:.3f} to {loop[-1]['test']:.3f}; "
                         + (f"first {unit} drop at most {drop:.3f}" if drop > 0 else
                            f"first {unit}' Dice never dropped (rose by at least {-drop:.3f})"), where))
    return rows


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def kept_parts(path: Path, measured: list[str]) -> dict:
    """The parts of an earlier result at ``path`` that a run measuring ``measured`` keeps, each
    with its own machine and settings (the file's own when the part has none)."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text(encoding="utf-8"))
    if earlier.get("quick"):
        return {}  # a quick run's figures never sit beside a real run's
    return {part: {"machine": earlier.get("machine"), "settings": earlier.get("settings"), **earlier[part]}
            for part in _PART_NAMES if part in earlier and part not in measured}


def merged_points(earlier: dict, part: dict) -> dict:
    """``part`` (a run of new seeds) with the points of ``earlier`` (the same part, from an earlier
    real run on the same test cases) whose size and seed it did not measure; the seeds are the
    union, and the correction loop the earlier one when this run has none."""
    if earlier.get("test_cases") != part.get("test_cases"):
        raise ValueError("the earlier run's test cases differ: its points cannot sit beside these")
    same = ("cpu", "cpu_count", "cpu_vector_flags", "gpu")
    if {k: (earlier.get("machine") or {}).get(k) for k in same} != {k: (part.get("machine") or {}).get(k) for k in same}:
        raise ValueError("the earlier run was on another machine: its training times cannot sit beside these")
    measured = {(p["cases"], p["seed"]) for p in part["points"]}
    commit = (earlier.get("machine") or {}).get("commit")  # points kept say the code they were measured with
    points = [{"commit": commit, **p} for p in earlier["points"] if (p["cases"], p["seed"]) not in measured] \
        + part["points"]
    settings = dict(part.get("settings") or {})
    settings["seeds"] = sorted({p["seed"] for p in points})
    merged = {**part, "points": sorted(points, key=lambda p: (p["cases"], p["seed"])), "settings": settings}
    if "correction_loop" not in part and "correction_loop" in earlier:
        merged["correction_loop"] = earlier["correction_loop"]
    return merged


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, cases and test cases, one seed")
    parser.add_argument("--parts", default=None, help="default: hippocampus,hc18 (--quick: hc18, the 2D part, "
                        "whose test images embed in one encoder call each)")
    parser.add_argument("--loop-parts", default=None, help="parts that run the correction loop (default: all; "
                        "--quick: hc18)")
    parser.add_argument("--steps", type=int, default=None, help="override the settings' training steps")
    parser.add_argument("--embedding-budget", type=int, default=None, help="override the embedding budget")
    parser.add_argument("--sizes", default=None, help="override the training-case counts, e.g. 3,5")
    parser.add_argument("--seeds", default=None, help="override the seeds, e.g. 0,1")
    parser.add_argument("--keep-other-parts", action="store_true",
                        help="keep the parts of the existing output that this run does not measure (each "
                        "keeps its own machine and settings)")
    parser.add_argument("--add-seeds", action="store_true",
                        help="keep the points of the existing output's measured parts that this run does not "
                        "measure (other seeds, same test cases): adds seeds to a real run")
    parser.add_argument("-o", "--output", default=str(RESULT))
    args = parser.parse_args(argv)
    if not DATA_DIR.is_dir():
        print(f"learning_curves: data folder {DATA_DIR} is absent", file=sys.stderr)
        return 2
    settings = dict(QUICK if args.quick else SETTINGS)
    for name in ("steps", "embedding_budget"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.sizes:
        settings["sizes"] = [int(n) for n in args.sizes.split(",")]
    if args.seeds:
        settings["seeds"] = [int(n) for n in args.seeds.split(",")]
    parts = [p for p in (args.parts or ("hc18" if args.quick else "hippocampus,hc18")).split(",") if p]
    loop_parts = (args.loop_parts or ",".join(parts)).split(",")
    result = {"benchmark": "learning_curves", "quick": args.quick, "machine": machine(), "settings": settings,
              "adapter": "frozen encoder + embedding adapter (CPU default)",
              "baseline": "MONAI UNet (16-32-64-128, 2 residual units), DiceCELoss, fine-tuning's whole training "
                          "time (the adapter's, and the U-Net candidate's where fine-tuning trains one)",
              "memory_note": "process_peak_rss_mb: the benchmark process's peak so far, not the point's own"}
    if (args.keep_other_parts or args.add_seeds) and args.quick:
        print("learning_curves: --keep-other-parts and --add-seeds keep a real run's figures; a quick run cannot",
              file=sys.stderr)
        return 2
    if args.keep_other_parts:
        result.update(kept_parts(Path(args.output), parts))
    earlier_parts = kept_parts(Path(args.output), []) if args.add_seeds else {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        for part in parts:
            result[part] = run_part(part, settings, Path(folder), part in loop_parts)
            result[part].update(machine=result["machine"], settings=settings)
            if part in earlier_parts:
                result[part] = merged_points(earlier_parts[part], result[part])
                result["settings"] = {**result["settings"], "seeds": sorted(
                    set(result["settings"]["seeds"]) | set(result[part]["settings"]["seeds"]))}
            result["seconds"] = round(time.monotonic() - started, 1)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    result["machine"]["load_average_end"] = list(__import__("os").getloadavg())
    atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    print(json.dumps({part: {k: v for k, v in result[part].items() if k != "test_cases"} for part in parts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
