"""SIGKILL at random points of a batch run, then ``--resume``: nothing half-written, nothing left over.

A separate process runs ``run_batch`` with the tiny random network (plumbing, not accuracy: the
kill points are what matter) on small volumes with 3D boxes. It is killed several times at
random moments, each time after it has started working; after every kill each output present
must be a complete, readable label map and ``summary.csv`` a complete CSV. A last run to the
end must leave every case done, no temporaries, and a further run must skip every case.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MedFMSegmentLib.files import is_own_temporary
from MedFMSegmentLib.io import read_label

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DRIVER = """
import json, sys
from MedFMSegmentLib.batch import BatchSettings, load_prompts_file, run_batch
from MedFMSegmentLib.models import tiny_random_model_for_tests

inputs, out, prompts = json.loads(sys.argv[1])
model = tiny_random_model_for_tests()
print("ready", flush=True)
results = run_batch(inputs, out, BatchSettings(device="cpu", resume=True, prompts=load_prompts_file(prompts)),
                    model=model, progress=lambda done, total, result: print(result.status, flush=True))
print("done", json.dumps([r.status for r in results]), flush=True)
"""
CASES = 8
KILLS = 4
KILL_LOOP_SECONDS = 45.0


def _inputs(folder: Path) -> tuple[list[str], Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    inputs, prompts = [], {}
    for n in range(CASES):
        volume = (rng.random((12, 48, 48)) * 100).astype(np.float32)
        volume[3:9, 10:30, 12:34] += 300
        path = folder / f"case{n}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(path))
        inputs.append(str(path))
        prompts[path.name] = {"box": [12, 10, 5, 33, 29, 5]}  # one slice: cheap on a shared CPU
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return inputs, folder / "prompts.json"


def _start(inputs: list[str], out: Path, prompts: Path, log: Path) -> tuple[subprocess.Popen, queue.Queue]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps([inputs, str(out), str(prompts)])],
                               stdout=subprocess.PIPE, stderr=log.open("a"), text=True, env=env)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return process, lines


def _wait_for(lines: queue.Queue, prefix: str, timeout: float = 120.0) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            return None
        if line.startswith(prefix):
            return line
    return None


def _assert_consistent(out: Path) -> None:
    """Every visible output is a whole label map; summary.csv is a whole CSV."""
    for path in out.iterdir():
        if path.name.startswith("."):
            continue
        if path.name == "summary.csv":
            rows = list(csv.DictReader(path.open()))
            assert all(r["status"] in ("ok", "skipped", "failed") and r["error"] == "" for r in rows), rows
        else:
            label = read_label(path)
            assert label.array.shape == (12, 48, 48) and set(np.unique(label.array)) <= {0, 1}


def test_sigkill_then_resume_loses_nothing(tmp_path):
    inputs, prompts = _inputs(tmp_path / "in")
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    rng = np.random.default_rng(int(time.time()))
    started, kills = time.monotonic(), 0
    while kills < KILLS and time.monotonic() - started < KILL_LOOP_SECONDS:
        process, lines = _start(inputs, out, prompts, log)
        assert _wait_for(lines, "ready") == "ready", log.read_text(encoding="utf-8")
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        kills += process.returncode == -signal.SIGKILL
        if out.is_dir():
            _assert_consistent(out)
    assert kills >= 1, "the batch finished before it could be killed"

    process, lines = _start(inputs, out, prompts, log)
    done = _wait_for(lines, "done")
    process.wait(timeout=120)
    assert done is not None and process.returncode == 0, log.read_text(encoding="utf-8")
    assert set(json.loads(done[len("done "):])) <= {"ok", "skipped"}
    _assert_consistent(out)
    assert [p.name for p in out.iterdir() if is_own_temporary(p)] == []
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [f"case{n}.nii.gz" for n in range(CASES)] + ["summary.csv"])

    process, lines = _start(inputs, out, prompts, log)
    done = _wait_for(lines, "done")
    process.wait(timeout=120)
    assert done is not None, log.read_text(encoding="utf-8")
    assert json.loads(done[len("done "):]) == ["skipped"] * CASES
