"""The benchmark package: one entry point, suites found by name, results that rebuild the docs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ is a top-level package of the checkout, not installed

from bench import __main__ as dispatcher  # noqa: E402
from bench import common, data, report  # noqa: E402


def test_help_lists_the_suites():
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.split("suites:")[1].splitlines() if line.startswith("  ")}
    assert {"core", "perf", "finetune", "batch", "gpu"} <= listed
    assert "report" in out.stdout and "common" not in listed and "data" not in listed


def test_unknown_suite_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "bench", "nosuch"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "unknown suite" in out.stderr and "Traceback" not in out.stderr


def test_a_new_module_with_main_is_a_suite(tmp_path, monkeypatch):
    (tmp_path / "service.py").write_text('"""Round trip through the server."""\n\ndef main(argv=None):\n    return 0\n')
    (tmp_path / "helpers.py").write_text('"""No main here."""\n\nX = 1\n')
    (tmp_path / "data.py").write_text('def main(argv=None):\n    return 0\n')
    monkeypatch.setattr(dispatcher, "HERE", tmp_path)
    assert dispatcher.suites() == {"service": "Round trip through the server."}


def test_report_reproduces_the_committed_docs():
    """``python -m bench report`` on the committed results gives docs/benchmarks.md and README's table exactly."""
    results = report.load_results()
    assert (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8") == report.render(results)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert report.HEADLINE_START in readme
    assert report._readme_with_table(readme, report.headline_table(results)) == readme
    out = subprocess.run([sys.executable, "-m", "bench", "report", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_every_headline_figure_names_its_hardware():
    rows = report.headline_rows(report.load_results())
    assert len(rows) >= 8
    for what, value, hardware, suite in rows:
        assert hardware and hardware != "unknown", what
        assert (ROOT / "bench" / "results" / f"{suite}.json").is_file()


def test_results_record_machine_versions_and_settings():
    """Results saved through ``common.save`` carry the machine, versions and settings of their runs."""
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        module = ROOT / "bench" / f"{path.stem}.py"
        if module.exists() and "save(" not in module.read_text(encoding="utf-8"):
            continue  # a suite with its own format; the report gives it a pointer to its JSON
        assert result["suite"] == path.stem
        assert "versions" in result and "settings" in result, path.name
        for run in [result] + result.get("history", []) + result.get("runs", []):
            assert run.get("machine") or run.get("device"), path.name


def test_save_keeps_history_and_writes_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "machine", lambda: {"commit": "x"})
    target = tmp_path / "core.json"
    target.write_text(json.dumps({"suite": "core", "figure": 1, "history": [{"label": "old", "figure": 0}]}))
    common.save("core", {"figure": 2}, {"hc18": 3, "output": str(target)}, str(target))
    saved = json.loads(target.read_text(encoding="utf-8"))
    assert saved["figure"] == 2 and saved["history"] == [{"label": "old", "figure": 0}]
    assert saved["settings"] == {"hc18": 3} and saved["machine"] == {"commit": "x"}
    assert saved["versions"]["medfmsegment"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["core.json"]


def test_case_rules_match_the_committed_results(data_dir):
    core = json.loads((ROOT / "bench" / "results" / "core.json").read_text(encoding="utf-8"))
    assert data.hippocampus_names(20) == core["hippocampus"]["case_names"]
    offset = next(h for h in core["history"] if h["settings"].get("offset") == 5)
    assert data.hippocampus_names(20, 5) == offset["hippocampus"]["case_names"]


def test_hc18_split_keeps_subjects_apart(data_dir):
    names = data.hc18_names(1000)
    train_prefixes = set(sorted({n.split("_")[0] for n in names})[:10])
    train, test = data.hc18_split(10, 30)
    assert len(train) == 10 and len(test) == 30
    assert {Path(img.source).name.split("_")[0] for img, _ in train} <= train_prefixes
    assert not {Path(img.source).name.split("_")[0] for img, _ in test} & train_prefixes


@pytest.mark.parametrize("suite", ["core", "perf", "finetune", "batch", "gpu", "adapter_pairs", "automatic",
                                   "box3d_ceiling", "encoder_gpu", "model_cost", "demo", "encoder_views"])
def test_suite_imports_as_a_package_module_and_parses_its_options(suite, capsys):
    with pytest.raises(SystemExit) as done:
        dispatcher.main([suite, "--help"])
    assert done.value.code == 0 and f"python -m bench {suite}" in capsys.readouterr().out


def test_a_new_suite_adds_its_own_section_and_headline_rows(monkeypatch):
    """A suite that lands later (``bench/<name>.py``) renders its own part without edits to the report."""
    import types

    module = types.ModuleType("bench.roundtrip")
    module.report_section = lambda result: ["## roundtrip", "", f"added latency {result['added_ms']} ms"]
    module.headline_rows = lambda result: [("Prompt through the service", f"+{result['added_ms']} ms", "2-core CPU")]
    monkeypatch.setitem(sys.modules, "bench.roundtrip", module)
    monkeypatch.setattr(report, "_suite_hook", lambda suite, name: getattr(module, name) if suite == "roundtrip" else None)
    results = {**report.load_results(), "roundtrip": {"suite": "roundtrip", "added_ms": 1.5}}
    page = report.render(results)
    assert "## roundtrip\n\nadded latency 1.5 ms" in page
    assert "| Prompt through the service | +1.5 ms | 2-core CPU | [`roundtrip`](benchmarks.md#roundtrip) |" in page


def test_encoder_views_mosaic_tiles_come_from_fixed_groups_and_match_their_slices():
    """The mosaic a slice is cut from is its fixed group of four, whatever else was asked for, and
    each tile's embedding is its own slice's (tiny random-weight model: plumbing only)."""
    import numpy as np
    import torch

    from bench.encoder_views import mosaic_embeddings
    from MedFMSegmentLib.inference import SegmentationSession
    from MedFMSegmentLib.io import MedicalImage
    from MedFMSegmentLib.models import tiny_random_model_for_tests

    volume = np.random.default_rng(0).random((9, 20, 24)).astype(np.float32)  # (K, J, I), 9 axial slices
    session = SegmentationSession(tiny_random_model_for_tests(), MedicalImage.from_array(volume))
    alone = mosaic_embeddings(session, 2, [5])
    together = mosaic_embeddings(session, 2, [4, 5, 6, 7, 8])
    assert sorted(alone) == [4, 5, 6, 7] and sorted(together) == [4, 5, 6, 7, 8]
    assert torch.equal(alone[5], together[5]) and together[5].shape == session.embedding_along(2, 5).shape
    flipped = volume.copy()
    flipped[5] = flipped[5][::-1]  # change slice 5 only: its tile changes most, the others less
    changed = mosaic_embeddings(SegmentationSession(session.model, MedicalImage.from_array(flipped)), 2, [4, 5])
    differences = {k: float((changed[k] - together[k]).abs().mean()) for k in (4, 5, 6, 7)}
    assert max(differences, key=differences.get) == 5


def test_learning_curves_section_averages_seeds_and_lists_the_correction_rounds():
    from bench import learning_curves

    def point(cases, seed, auto):
        return {"cases": cases, "seed": seed, "training_seconds": 100.0 + seed, "steps": 2000, "adapted_automatic": auto,
                "adapted_box": 0.9, "baseline_dice": 0.5, "baseline_steps": 40, "baseline_seconds": 100.0,
                "process_peak_rss_mb": 1000.0 + seed}

    loop = [{"round": 0, "cases": 3, "training_seconds": 100.0, "test": 0.8, "first_cases": 0.85},
            {"round": 1, "cases": 5, "training_seconds": 40.0, "test": 0.82, "first_cases": 0.845,
             "first_cases_drop": 0.005, "test_trained_at_once": 0.83}]
    result = {"settings": {**learning_curves.SETTINGS, "seeds": [0, 1]}, "adapter": "adapter", "baseline": "U-Net",
              "machine": {"cpu": "CPU", "cpu_count": 2},
              "hc18": {"test_cases": ["a.png"], "zero_shot_box": 0.91, "correction_loop": loop,
                       "points": [point(1, 0, 0.6), point(1, 1, 0.8), point(3, 0, 0.9)]}}
    lines = learning_curves.report_section(result)
    assert ("| 1 | 0.700 (0.600-0.800) | 0.900 (0.900-0.900) | 0.500 (0.500-0.500) | 100 | 2000 / 40 | 1001 |"
            in lines)
    assert "| 3 | 0.900 | 0.900 | 0.500 | 100 | 2000 / 40 | 1000 |" in lines
    assert "| 1 | 5 | 40 | 0.820 | 0.830 | 0.845 | 0.0050 |" in lines
    assert any("1 test image;" in line for line in lines) and not any("Quick run" in line for line in lines)
    (what, value, hardware), (loop_what, loop_value, _) = learning_curves.headline_rows(result)
    assert "1/3 training images" in what and value == "0.700 / 0.900 against 0.500 / 0.500 (means over 2/1 seeds)" and hardware == "2-core CPU"
    assert "3 to 5 images" in loop_what and loop_value == "automatic Dice 0.800 to 0.820; first images drop at most 0.005"
    assert learning_curves.headline_rows({**result, "quick": True}) == []


def test_learning_curves_keep_the_other_parts_of_a_real_run_with_their_own_machine(tmp_path):
    from bench import learning_curves

    earlier = {"quick": False, "machine": {"cpu": "Old CPU", "cpu_count": 2}, "settings": {"seeds": [0]},
               "hc18": {"points": []}, "hippocampus": {"points": [], "zero_shot_box": 0.8}}
    path = tmp_path / "learning_curves.json"
    path.write_text(json.dumps(earlier))
    kept = learning_curves.kept_parts(path, ["hc18"])
    assert list(kept) == ["hippocampus"] and kept["hippocampus"]["machine"]["cpu"] == "Old CPU"
    assert kept["hippocampus"]["zero_shot_box"] == 0.8 and kept["hippocampus"]["settings"] == {"seeds": [0]}
    path.write_text(json.dumps({**earlier, "quick": True}))
    assert learning_curves.kept_parts(path, ["hc18"]) == {}, "a quick run's figures are never kept"
    assert learning_curves.kept_parts(tmp_path / "absent.json", ["hc18"]) == {}
    result = {"settings": learning_curves.SETTINGS, "adapter": "a", "baseline": "b", "machine": {"cpu": "New CPU"},
              "hippocampus": {**kept["hippocampus"], "test_cases": ["x"]}}
    assert any("Measured on 2-core Old CPU" in line for line in learning_curves.report_section(result))


def test_learning_curves_add_seeds_beside_an_earlier_runs_points():
    from bench import learning_curves

    earlier = {"test_cases": ["a", "b"], "points": [{"cases": 1, "seed": 0, "x": "old"}, {"cases": 3, "seed": 0},
                                                   {"cases": 1, "seed": 1, "x": "replaced"}],
               "correction_loop": [{"round": 0}], "settings": {"seeds": [0]}}
    new = {"test_cases": ["a", "b"], "points": [{"cases": 1, "seed": 1, "x": "new"}], "settings": {"seeds": [1]}}
    merged = learning_curves.merged_points(earlier, new)
    assert [(p["cases"], p["seed"]) for p in merged["points"]] == [(1, 0), (1, 1), (3, 0)]
    assert merged["points"][1]["x"] == "new" and merged["settings"]["seeds"] == [0, 1]
    assert merged["correction_loop"] == [{"round": 0}]
    with pytest.raises(ValueError, match="test cases differ"):
        learning_curves.merged_points({**earlier, "test_cases": ["c"]}, new)
    with pytest.raises(ValueError, match="another machine"):
        learning_curves.merged_points({**earlier, "machine": {"cpu": "Old CPU"}}, {**new, "machine": {"cpu": "New CPU"}})
