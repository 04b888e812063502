"""The inference service end to end: a real ``medfmsegment serve`` on 127.0.0.1, the real LiteMedSAM,
real hippocampus MRI; every answer compared with the same call in process."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from MedFMSegmentLib.geometry import VolumeGeometry
from MedFMSegmentLib.io import MedicalImage, read_image, read_label
from MedFMSegmentLib.service.client import ServiceClient, ServiceError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
HIPPO = "msd_hippocampus_mri"


def start_server(tmp: Path, *extra: str, timeout: float = 120.0) -> tuple[subprocess.Popen, dict]:
    """Start ``medfmsegment serve`` on a free loopback port; ``(process, ready line)``."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    command = [sys.executable, "-m", "MedFMSegmentLib.cli", "serve", "--token-file", str(tmp / "token"),
               "--adapter-dir", str(tmp / "adapters"), *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=open(tmp / "stderr.txt", "wb"), env=env,
                               cwd=PROJECT_ROOT)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout):
        process.kill()
        raise AssertionError(f"no ready line in {timeout} s: {(tmp / 'stderr.txt').read_text(encoding='utf-8')[-2000:]}")
    line = process.stdout.readline()
    if not line:
        process.wait(10)
        raise AssertionError(f"server ended: {(tmp / 'stderr.txt').read_text(encoding='utf-8')[-2000:]}")
    return process, json.loads(line)


def stop_server(process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """``sig`` (SIGTERM), then the exit code (killed after 60 s)."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def cropped_case(data_dir: Path, number: int, slices: int = 6) -> tuple[MedicalImage, MedicalImage]:
    """A hippocampus image and label, kept to ``slices`` axial (K) slices through the label's middle."""
    image = read_image(data_dir / HIPPO / "imagesTr" / f"hippocampus_{number:03d}.nii.gz")
    label = read_label(data_dir / HIPPO / "labelsTr" / f"hippocampus_{number:03d}.nii.gz")
    ks = np.flatnonzero(label.array.any(axis=(1, 2)))
    first = int(ks[len(ks) // 2]) - slices // 2
    g = image.geometry
    origin = tuple(np.asarray(g.origin) + g.direction @ (np.array([0, 0, first]) * np.asarray(g.spacing)))
    geometry = VolumeGeometry((g.size[0], g.size[1], slices), g.spacing, origin, g.direction)
    crop = slice(first, first + slices)
    return (MedicalImage(np.ascontiguousarray(image.array[crop]), geometry),
            MedicalImage(np.ascontiguousarray(label.array[crop]), geometry))


def label_box(label: np.ndarray, k: int | None = None) -> list[int]:
    """Tight box (i0, j0, k0, i1, j1, k1) of a label, flat on slice ``k`` when given."""
    ks, js, is_ = np.nonzero(label if k is None else label[k:k + 1])
    k0, k1 = (int(ks.min()), int(ks.max())) if k is None else (k, k)
    return [int(is_.min()), int(js.min()), k0, int(is_.max()), int(js.max()), k1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One server for the module; its SIGTERM exit code is checked at the end."""
    tmp = tmp_path_factory.mktemp("service")
    process, ready = start_server(tmp)
    ready["token"] = Path(ready["token_file"]).read_text(encoding="utf-8").strip()
    ready["adapters"] = tmp / "adapters"
    yield ready
    assert stop_server(process) == 0, (tmp / "stderr.txt").read_text(encoding="utf-8")[-2000:]
    assert Path(ready["token_file"]).read_text(encoding="utf-8").strip() == ready["token"]  # a named token file stays


@pytest.fixture(scope="module")
def client(service):
    return ServiceClient(service["url"], service["token"], timeout=300)


@pytest.fixture(scope="module")
def hippo(data_dir):
    image = read_image(data_dir / HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
    label = read_label(data_dir / HIPPO / "labelsTr" / "hippocampus_001.nii.gz")
    return image, label.array > 0


def in_process(model, image, prompts, **options):
    from MedFMSegmentLib.api import segment_image
    from MedFMSegmentLib.inference import PredictorSettings
    from MedFMSegmentLib.prompts import Prompts

    settings = PredictorSettings(box3d_strategy=options.pop("box3d_strategy", "auto"))
    return segment_image(model, image, Prompts.from_dict(prompts), settings=settings, **options)


def test_ready_line_and_info(service, client):
    assert set(service) >= {"url", "token_file", "pid"}
    assert service["url"].startswith("http://127.0.0.1:")
    assert os.stat(service["token_file"]).st_mode & 0o777 == 0o600
    info = client.info()
    assert info["models"] == ["litemedsam"] and info["device"] == "cpu"
    assert info["limits"]["max_json_bytes"] > 0 and "fastapi" in info["versions"]


def test_2d_box_gives_the_in_process_mask(client, hippo, litemedsam):
    image, label = hippo
    k = int(np.flatnonzero(label.any(axis=(1, 2)))[len(np.flatnonzero(label.any(axis=(1, 2)))) // 2])
    prompts = {"box": label_box(label, k)}
    vid = client.upload_volume(image.array, image.geometry)
    assert client.upload_volume(image.array, image.geometry) == vid  # content-derived, not sent twice
    reply = client.prompt(vid, prompts)
    assert reply.job_id is None and reply.array_axis == 0 and reply.index == k
    expected = in_process(litemedsam, image, prompts)
    assert reply.mask.shape == image.array.shape and reply.mask[k].sum() > 20
    np.testing.assert_array_equal(reply.mask, expected)
    np.testing.assert_array_equal(reply.plane, expected[k])


def test_3d_box_job_grows_and_ends_at_the_in_process_mask(client, hippo, litemedsam):
    image, label = hippo
    prompts = {"box": label_box(label)}
    vid = client.upload_volume(image.array, image.geometry)
    reply = client.prompt(vid, prompts, box3d_strategy="propagate")
    assert reply.mask is None and reply.job_id
    shown, cursor, sizes, stages = np.zeros(image.array.shape, bool), 0, [], set()
    while True:
        status = client.job(reply.job_id)
        stages.add(status.stage)
        cursor_next, items = client.updates(reply.job_id, cursor)
        assert cursor_next == cursor + len(items)
        for axis, index, plane in items:
            np.moveaxis(shown, axis, 0)[index] = plane
        cursor = cursor_next
        sizes.append(int(shown.sum()))
        if status.finished:
            break
        time.sleep(0.3)
    assert status.state == "done" and status.done == status.planned > 1
    assert sizes == sorted(sizes) and len(set(sizes)) > 2  # grew, slice by slice, never shrank
    result = client.result(reply.job_id)
    np.testing.assert_array_equal(shown, result)
    np.testing.assert_array_equal(result, in_process(litemedsam, image, prompts, box3d_strategy="propagate"))


def test_focus_embeds_ahead_and_two_clients_on_two_volumes(service, data_dir, litemedsam):
    cases = [cropped_case(data_dir, n) for n in (3, 4)]
    answers: dict[int, object] = {}

    def run(n: int) -> None:
        try:
            image, label = cases[n]
            worker = ServiceClient(service["url"], service["token"], timeout=300)
            vid = worker.upload_volume(image.array, image.geometry)
            worker.focus(vid, "axial", 3, radius=0)
            answers[n] = worker.prompt(vid, {"box": label_box(label.array > 0, 3)}).mask
        except Exception as exc:  # noqa: BLE001 - reported below
            answers[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for n, (image, label) in enumerate(cases):
        assert isinstance(answers[n], np.ndarray), answers[n]
        np.testing.assert_array_equal(answers[n], in_process(litemedsam, image, {"box": label_box(label.array > 0, 3)}))
        assert answers[n][3].any()


def test_finetune_job_then_automatic_with_the_adapter(client, service, data_dir, tmp_path):
    from MedFMSegmentLib.api import segment_image
    from MedFMSegmentLib.finetune.adapters import load_adapted_model
    from MedFMSegmentLib.prompts import Prompts

    train = [cropped_case(data_dir, n) for n in (6, 7)]
    config = {"name": "hippo-test", "encoder": "frozen", "steps": 4, "validate_every": 2, "embedding_budget": 6,
              "max_validation_slices": 2}
    job = client.finetune([c[0] for c in train], [c[1] for c in train], config)
    seen = []
    result = client.wait(job, poll=0.2, progress=seen.append)
    assert result["adapter"] == "hippo-test" and result["metadata"]["steps"] == 4
    assert seen[-1].planned == 4 and seen[-1].metrics["step"] == 4 and np.isfinite(seen[-1].metrics["loss"])
    assert [a["name"] for a in client.adapters()] == ["hippo-test"]
    with pytest.raises(ServiceError) as refused:
        client.finetune([c[0] for c in train], [c[1] for c in train], config)
    assert refused.value.status == 400 and "exists" in refused.value.message

    copy = client.download_adapter("hippo-test", tmp_path / "copy")
    for name in ("adapter.safetensors", "metadata.json"):
        assert (copy / name).read_bytes() == (service["adapters"] / "hippo-test" / name).read_bytes()
    assert client.upload_adapter(copy, "hippo-copy")["metadata"]["steps"] == 4
    with pytest.raises(ServiceError) as exists:
        client.upload_adapter(copy, "hippo-copy")
    assert exists.value.status == 409
    assert [a["name"] for a in client.adapters()] == ["hippo-copy", "hippo-test"]

    image, _ = cropped_case(data_dir, 8)
    vid = client.upload_volume(image.array, image.geometry)
    job = client.automatic(vid, "hippo-test")
    mask = client.wait(job)
    shown = np.zeros(mask.shape, bool)
    for axis, index, plane in client.updates(job, 0)[1]:  # automatic mode reports its slices at its end
        np.moveaxis(shown, axis, 0)[index] = plane
    np.testing.assert_array_equal(shown, mask)
    model, info = load_adapted_model(service["adapters"] / "hippo-test")
    expected = segment_image(model, image, Prompts(), adapter_info=info)
    np.testing.assert_array_equal(mask, expected)


def start_long_finetune(client: ServiceClient, data_dir: Path, name: str, numbers: tuple[int, int],
                        stage: str) -> str:
    """A fine-tuning job of 5000 steps on two cropped cases, once it reached ``stage``; its id."""
    train = [cropped_case(data_dir, n) for n in numbers]
    job = client.finetune([c[0] for c in train], [c[1] for c in train],
                          {"name": name, "encoder": "frozen", "steps": 5000, "embedding_budget": 4})
    deadline = time.monotonic() + 240
    while client.job(job).stage != stage and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.job(job).state == "running" and client.job(job).stage == stage
    return job


def test_finetune_cancel_leaves_no_adapter(client, service, data_dir):
    job = start_long_finetune(client, data_dir, "never-written", (11, 14), "training")
    client.cancel(job)
    with pytest.raises(ServiceError, match="cancelled"):
        client.wait(job)
    assert client.job(job).state == "cancelled" and client.job(job).metrics["step"] < 5000
    assert not (service["adapters"] / "never-written").exists()
    assert not [p for p in service["adapters"].iterdir() if p.name.startswith(".")]


def test_cli_segment_with_server_writes_the_in_process_file(service, hippo, tmp_path):
    from MedFMSegmentLib.api import segment_file
    from MedFMSegmentLib.prompts import Prompts

    image, label = hippo
    source = image.source
    k = int(np.flatnonzero(label.any(axis=(1, 2)))[0]) + 3
    box = label_box(label, k)
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    run = subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", "segment", source, "-o",
                          str(tmp_path / "remote.nii.gz"), "--box", *map(str, box), "--server", service["url"],
                          "--token-file", service["token_file"]], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    segment_file(source, tmp_path / "local.nii.gz", Prompts(box=tuple(box)), device="cpu")
    remote, local = read_label(tmp_path / "remote.nii.gz"), read_label(tmp_path / "local.nii.gz")
    np.testing.assert_array_equal(remote.array, local.array)
    assert remote.geometry.same_grid(local.geometry) and remote.array.any()
    missing = subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", "segment", source, "-o",
                              str(tmp_path / "x.nii.gz"), "--box", *map(str, box), "--server", service["url"]],
                             capture_output=True, text=True, env=dict(env, MEDFMSEGMENT_TOKEN="wrong" * 4),
                             timeout=300)
    said = missing.stderr.replace(service["url"], "<url>")  # a random port may itself contain "401"
    assert missing.returncode == 2 and "401" not in said and "token" in said
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.nii.gz").exists()


def test_frames_round_trip_and_volume_ids_follow_the_content():
    from MedFMSegmentLib.service.wire import WireError, decode_frame, encode_frame, volume_id

    rng = np.random.default_rng(0)
    arrays = [rng.random((3, 5, 7)) > 0.5, rng.integers(-500, 500, (2, 3, 4), dtype=np.int16),
              rng.random((1, 2, 3)).astype(np.float32)]
    for level in (0, 1):
        header, decoded = decode_frame(encode_frame(arrays, {"note": "x"}, level=level))
        assert header["note"] == "x"
        for a, b in zip(arrays, decoded):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    with pytest.raises(WireError, match="over the limit"):
        decode_frame(encode_frame([np.zeros((4, 4, 4), np.float64)]), max_bytes=100)
    geometry = VolumeGeometry.identity((7, 5, 3))
    base = volume_id(arrays[0].astype(np.uint8), geometry, False)
    assert base == volume_id(arrays[0].astype(np.uint8).copy(), geometry, False)
    assert base != volume_id(arrays[0].astype(np.uint8), VolumeGeometry.identity((7, 5, 3), (1, 1, 2)), False)
    assert base != volume_id(arrays[0].astype(np.int16), geometry, False)
    changed = arrays[0].astype(np.uint8)
    changed[0, 0, 0] ^= 1
    assert base != volume_id(changed, geometry, False)


def test_finetune_job_continues_an_adapter_and_reports_base_and_adapted_dice(client, service, data_dir):
    """Slicer's "Update adapter": a finetune job "from" an adapter, written back under its name;
    both jobs end with the base model's and the adapter's validation Dice, as the metadata has them."""
    from MedFMSegmentLib.finetune.adapter_format import read_metadata, weights_sha256

    first, new = cropped_case(data_dir, 3), cropped_case(data_dir, 4)
    config = {"name": "hippo-update", "encoder": "frozen", "steps": 2, "embedding_budget": 4}
    job = client.finetune([first[0]], [first[1]], config)
    result = client.wait(job)
    folder = service["adapters"] / "hippo-update"
    meta = read_metadata(folder)
    status = client.job(job)
    for key in ("base_validation_dice", "adapted_validation_dice"):
        assert result[key] == meta[key] == status.metrics[key] and 0 <= meta[key] <= 1
    assert status.metrics["base_val_dice"] == meta["base_validation_dice"]
    assert f"{meta['adapted_validation_dice']:.3f} adapted, {meta['base_validation_dice']:.3f} base model" in \
        status.message
    parent_sha = weights_sha256(folder)
    for refused, why in (({"name": "child", "from": "hippo-update", "encoder": "lora"}, "keeps its parent's encoder"),
                         ({"name": "child", "from": "no-such-adapter"}, "no adapter named"),
                         ({"name": "hippo-update", "from": "hippo-update"}, "exists"),
                         ({"name": "child", "automatic_net": "always"}, "automatic_net must be one of auto, off")):
        with pytest.raises(ServiceError) as error:
            client.finetune([new[0]], [new[1]], refused)
        assert error.value.status == 400 and why in error.value.message
    job = client.finetune([new[0]], [new[1]], {"name": "hippo-update", "from": "hippo-update", "overwrite": True,
                                               "steps": 2, "embedding_budget": 4})
    result = client.wait(job)
    meta = read_metadata(folder)
    assert result["from"] == "hippo-update" and result["metadata"]["lineage"] == meta["lineage"]
    entry = meta["lineage"][-1]
    assert entry["parent_weights_sha256"] == parent_sha and entry["cases_added"] == 1 and entry["cases_replayed"] == 0
    assert meta["encoder"] == "frozen" and meta["steps_planned"] == 2 and weights_sha256(folder) != parent_sha
    assert result["base_validation_dice"] == meta["base_validation_dice"] is not None
    assert "parent" in meta["validation_comparison"]
