"""The batch on a Dask LocalCluster (2 worker processes on 127.0.0.1, real LiteMedSAM, real MRI cases).

Same masks as the single-process batch; a worker killed mid-case (SIGKILL of its process) loses
no finished output and its case is retried once, then reported failed; ``--resume`` after the
client itself was killed. Prompts are one-slice boxes (one encoder pass per case) except where a
case must run long enough to be killed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

from MedFMSegmentLib.batch import BatchSettings, load_prompts_file, run_batch  # noqa: E402
from MedFMSegmentLib.cohort.cluster import open_cluster  # noqa: E402
from MedFMSegmentLib.cohort.distributed import preload, run_batch_on_cluster  # noqa: E402
from MedFMSegmentLib.io import read_image, read_label  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 single-thread worker processes on loopback, shared by this module."""
    with open_cluster("local:2") as dask_client:
        yield dask_client


def _hippocampus(data_dir: Path, count: int, slices: int = 1, first: int = 0):
    """``count`` hippocampus volumes and prompts: each label's box on ``slices`` slices around its middle."""
    folder = data_dir / "msd_hippocampus_mri"
    images = sorted(folder.glob("imagesTr/*.nii.gz"))[first:first + count]
    prompts = {}
    for path in images:
        label = read_image(folder / "labelsTr" / path.name).array > 0
        ks = np.flatnonzero(label.any(axis=(1, 2)))
        k0 = int(ks.mean()) - slices // 2
        _, j, i = np.nonzero(label[k0:k0 + slices])
        prompts[path.name] = {"box": [int(i.min()), int(j.min()), k0, int(i.max()), int(j.max()), k0 + slices - 1]}
    return [str(p) for p in images], prompts


def _settings(tmp_path: Path, prompts: dict, **kwargs) -> BatchSettings:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    return BatchSettings(device="cpu", prompts=load_prompts_file(path), **kwargs)


def _summary(folder: Path) -> list[dict]:
    with (folder / "summary.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_cluster_batch_matches_single_process(client, litemedsam, data_dir, tmp_path):
    inputs, prompts = _hippocampus(data_dir, 3)
    settings = _settings(tmp_path, prompts)
    single = run_batch(inputs, tmp_path / "single", settings, model=litemedsam)
    cores = len(os.sched_getaffinity(0))
    assert set(preload(client, settings).values()) == {("cpu", max(1, cores // 2))}  # the cores shared out
    seen = []
    clustered = run_batch_on_cluster(inputs, tmp_path / "cluster", settings, client, report=True,
                                     progress=lambda done, total, result: seen.append((done, total)))
    assert [r.status for r in single] == [r.status for r in clustered] == ["ok"] * 3
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert len({r.worker for r in clustered}) == 2  # both workers took cases
    for a, b in zip(single, clustered):
        assert Path(a.output).name == Path(b.output).name
        mask_a, mask_b = read_label(a.output), read_label(b.output)
        assert mask_a.geometry.same_grid(mask_b.geometry)
        assert mask_a.array.any() and np.array_equal(mask_a.array, mask_b.array), Path(a.output).name
    rows = _summary(tmp_path / "cluster")
    assert [r["input"] for r in rows] == inputs  # input order, whatever the completion order
    assert [int(r["foreground_voxels"]) for r in rows] == [r.foreground_voxels for r in single]
    qc = list(csv.DictReader((tmp_path / "cluster" / "qc.csv").open()))  # measured on the workers
    voxel_ml = [float(np.prod(read_image(p).geometry.spacing)) / 1000 for p in inputs]
    assert [float(r["volume_ml"]) for r in qc] == pytest.approx(
        [r.foreground_voxels * v for r, v in zip(single, voxel_ml)], abs=1e-3)
    assert (tmp_path / "cluster" / "report.html").read_text(encoding="utf-8").count("data:image/png;base64,") == 3


def _killer(client, targets: set[tuple[str, int]], killed: list, delay: float = 0.5):
    """A thread that SIGKILLs the worker process running each (case name, attempt) in ``targets``."""
    submitted: list[tuple[str, str]] = []
    stop = threading.Event()

    def on_submit(case, key):
        attempt = int(key.rsplit("-", 1)[1])
        if (case.name, attempt) in targets:
            submitted.append((case.name, key))

    def watch():
        while not stop.is_set():
            for name, key in list(submitted):
                where = [w for w, keys in client.processing().items() if key in keys]
                if where:
                    submitted.remove((name, key))
                    time.sleep(delay)  # well inside the case: model loaded or loading, slices encoding
                    pids = client.run(os.getpid, workers=where)
                    os.kill(pids[where[0]], signal.SIGKILL)
                    killed.append(key)
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return on_submit, stop


def test_killed_worker_loses_no_output_and_its_case_is_retried_once(client, data_dir, tmp_path):
    fast_inputs, fast_prompts = _hippocampus(data_dir, 2, first=3)
    slow_inputs, slow_prompts = _hippocampus(data_dir, 2, slices=10, first=5)
    inputs = slow_inputs + fast_inputs  # the slow ones are larger boxes, not larger images
    settings = _settings(tmp_path, {**fast_prompts, **slow_prompts})
    retried, lost = Path(slow_inputs[0]).name.split(".")[0], Path(slow_inputs[1]).name.split(".")[0]
    killed: list[str] = []
    on_submit, stop = _killer(client, {(retried, 1), (lost, 1), (lost, 2)}, killed)
    finished: dict[str, int] = {}

    def progress(done, total, result):
        if result.status == "ok":
            finished[result.output] = Path(result.output).stat().st_mtime_ns

    try:
        results = run_batch_on_cluster(inputs, tmp_path / "out", settings, client, progress=progress,
                                       on_submit=on_submit)
    finally:
        stop.set()
    assert len(killed) == 3
    by_name = {Path(r.output).name.split(".")[0]: r for r in results}
    assert by_name[retried].status == "ok" and by_name[retried].attempts == 2
    assert read_label(by_name[retried].output).array.any()
    assert by_name[lost].status == "failed" and by_name[lost].attempts == 2
    assert "worker died 2 times" in by_name[lost].error
    assert not Path(by_name[lost].output).exists()
    for path, mtime in finished.items():  # every output finished before or after a kill is intact
        assert Path(path).stat().st_mtime_ns == mtime and read_label(path).array.any()
    statuses = {Path(r["output"]).name.split(".")[0]: r["status"] for r in _summary(tmp_path / "out")}
    assert statuses == {name: r.status for name, r in by_name.items()}
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == sorted(
        [Path(r.output).name for r in results if r.status == "ok"] + ["summary.csv"])


def test_resume_after_the_client_is_killed(client, data_dir, tmp_path):
    inputs, prompts = _hippocampus(data_dir, 4, first=7)
    settings = _settings(tmp_path, prompts)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "MedFMSegmentLib.cli", "batch", *inputs, "-o", str(out), "--prompts",
               str(tmp_path / "prompts.json"), "--device", "cpu", "--cluster", "local:1"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "summary.csv").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)  # the client, after its first result: the worker loses its scheduler
        process.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its worker too, were it still running
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    assert 1 <= len(done_before) < 4, process.stdout.read().decode()[-2000:]
    rows_before = _summary(out)  # whole, never half-written
    assert all(r["status"] == "ok" for r in rows_before)

    results = run_batch_on_cluster(inputs, out, dataclasses.replace(settings, resume=True), client)
    statuses = {Path(r.output).name: r.status for r in results}
    assert {name for name, status in statuses.items() if status == "skipped"} == set(done_before)
    assert all(status in ("ok", "skipped") for status in statuses.values())
    for name, mtime in done_before.items():
        assert (out / name).stat().st_mtime_ns == mtime
    assert len(list(out.glob("*.nii.gz"))) == 4
    assert [r["status"] for r in _summary(out)] == [r.status for r in results]
