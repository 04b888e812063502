"""The inference service's overheads on this machine, through a real ``medfmsegment serve`` on loopback.

* 2D prompt round trip on a cached slice: client -> server -> mask, against the same
  ``SegmentationSession.segment`` call in process (the goal: under 5 ms added);
* upload of a 512 x 512 x 300 int16 volume (hash, frame, loopback, decode; uncompressed on
  loopback, with the zlib level 1 time a remote client would add), and the same call again once
  the server holds it (only an existence check is sent);
* time from a 3D box prompt to its first partial result (a slice update), and to its end;
* the 2D round trip while a 3D box job runs on another volume of the same service (the prompt
  waits for the job's current slice, not for the job), with the load average around it.

Run: ``python -m bench.service [--repeats N]``; writes ``bench/results/service.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import save  # noqa: E402
from data import DATA_DIR  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "service.json"


def _median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _hippocampus(number: int = 1):
    from MedFMSegmentLib.io import read_image, read_label

    image = read_image(DATA_DIR / "msd_hippocampus_mri" / "imagesTr" / f"hippocampus_{number:03d}.nii.gz")
    label = read_label(DATA_DIR / "msd_hippocampus_mri" / "labelsTr" / f"hippocampus_{number:03d}.nii.gz").array > 0
    ks, js, is_ = np.nonzero(label)
    k = int(np.median(ks))
    ys, xs = np.nonzero(label[k])
    flat = [int(xs.min()), int(ys.min()), k, int(xs.max()), int(ys.max()), k]
    box3d = [int(is_.min()), int(js.min()), int(ks.min()), int(is_.max()), int(js.max()), int(ks.max())]
    return image, flat, box3d


def round_trip(client, image, flat_box, repeats: int) -> dict:
    """Median ms of a 2D prompt on an embedded slice via the service and in process, measured
    alternately so that both see the same load; and of a bare request (HEAD of the volume)."""
    from MedFMSegmentLib.loading import load_model
    from MedFMSegmentLib.inference import SegmentationSession
    from MedFMSegmentLib.prompts import Prompts

    vid = client.upload_volume(image.array, image.geometry)
    client.prompt(vid, {"box": flat_box})  # embeds the slice
    session = SegmentationSession(load_model("litemedsam", device="cpu"), image)
    prompts = Prompts(box=tuple(flat_box))
    session.segment(prompts)
    served, local = [], []
    for _ in range(repeats):
        served.append(_median_ms(lambda: client.prompt(vid, {"box": flat_box}), 1))
        local.append(_median_ms(lambda: session.segment(prompts), 1))
    bare = _median_ms(lambda: client.has_volume(vid), repeats)
    return {"service_ms": round(statistics.median(served), 2), "in_process_ms": round(statistics.median(local), 2),
            "added_ms": round(statistics.median(np.subtract(served, local)), 2),
            "bare_request_ms": round(bare, 2), "repeats": repeats}


def upload(client) -> dict:
    """Seconds to send a 512 x 512 x 300 int16 volume, and to 'send' it again."""
    from MedFMSegmentLib.geometry import VolumeGeometry
    from MedFMSegmentLib.service.wire import encode_frame

    rng = np.random.default_rng(0)
    # CT-like content: smooth structures plus noise (pure noise would not compress at all).
    plane = ((np.sin(np.arange(512) / 40.0)[None] + np.cos(np.arange(512) / 55.0)[:, None]) * 300).astype(np.int16)
    array = np.empty((300, 512, 512), np.int16)
    for k in range(300):
        array[k] = plane + np.int16(300 * np.sin(k / 30.0)) + rng.integers(-20, 20, plane.shape, dtype=np.int16)
    geometry = VolumeGeometry.identity((512, 512, 300), (0.8, 0.8, 1.5))
    started = time.perf_counter()
    vid = client.upload_volume(array, geometry)
    first = time.perf_counter() - started
    started = time.perf_counter()
    client.upload_volume(array, geometry)
    again = time.perf_counter() - started
    started = time.perf_counter()
    compressed = len(encode_frame([array], {}, level=1))
    compress = time.perf_counter() - started
    client.delete_volume(vid)
    return {"seconds": round(first, 3), "again_seconds": round(again, 3), "raw_mb": round(array.nbytes / 2 ** 20, 1),
            "compression_level": client.compression, "zlib1_mb": round(compressed / 2 ** 20, 1),
            "zlib1_seconds": round(compress, 3)}


def first_partial(client, image, box3d) -> dict:
    """Seconds from a 3D box prompt (propagate) to the first slice update, and to the result."""
    vid = client.upload_volume(image.array, image.geometry)
    started = time.perf_counter()
    job = client.prompt(vid, {"box": box3d}, box3d_strategy="propagate").job_id
    first = None
    while True:
        cursor, items = client.updates(job, 0)
        if items and first is None:
            first = time.perf_counter() - started
        if client.job(job).finished:
            break
        time.sleep(0.02)
    client.result(job)
    return {"first_update_seconds": round(first or float("nan"), 3),
            "total_seconds": round(time.perf_counter() - started, 3), "updates": cursor}


def round_trip_during_job(service, image, flat_box, job_image, job_box) -> dict:
    """2D prompts on an embedded slice of ``image``, one after another, while a 3D box job
    (``propagate``, its slices not embedded yet) runs on ``job_image``, 0-1 s apart (random, so they
    arrive anywhere in a slice): median and worst ms of those answered while the job ran, the
    job's seconds and slices, the load average."""
    prompter, runner = service.client(), service.client()
    vid = prompter.upload_volume(image.array, image.geometry)
    prompter.prompt(vid, {"box": flat_box})  # embeds the slice
    job_vid = runner.upload_volume(job_image.array, job_image.geometry)
    load_before = os.getloadavg()
    started = time.perf_counter()
    job = runner.prompt(job_vid, {"box": job_box}, box3d_strategy="propagate").job_id
    while runner.job(job).state == "queued":
        time.sleep(0.01)
    during, pause = [], np.random.default_rng(0)
    while True:
        sent = time.perf_counter()
        prompter.prompt(vid, {"box": flat_box})
        elapsed = (time.perf_counter() - sent) * 1000
        status = runner.job(job)
        if status.finished:
            break
        during.append(elapsed)
        time.sleep(float(pause.uniform(0.0, 1.0)))  # a user's prompts come at any moment of a slice
    seconds = time.perf_counter() - started
    runner.result(job)
    return {"service_ms": round(statistics.median(during), 2) if during else None,
            "worst_ms": round(max(during), 2) if during else None, "prompts_during_job": len(during),
            "job_seconds": round(seconds, 2), "job_slices": status.done,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    from MedFMSegmentLib.service.launch import start_local_service

    service = start_local_service("--device", "cpu")
    try:
        client = service.client()
        image, flat, box3d = _hippocampus()
        job_image, _, job_box = _hippocampus(3)
        results = {"round_trip_2d": round_trip(client, image, flat, args.repeats), "upload_512x512x300_int16": upload(client),
                   "first_partial_3d_box": first_partial(client, image, box3d),
                   "round_trip_2d_during_3d_job": round_trip_during_job(service, image, flat, job_image, job_box)}
    finally:
        code = service.stop()
    settings = {"repeats": args.repeats, "device": "cpu", "volume": "hippocampus_001 (35 x 51 x 35)",
                "job_volume": "hippocampus_003", "box3d_strategy": "propagate",
                "note": "server and bench share the CPU; other processes ran on it too (see load_average)"}
    path = save("service", {"results": results, "server_exit_code": code}, settings, args.output)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def headline_rows(result: dict) -> list[tuple[str, str, str]]:
    """The service's rows of README's headline table (see :mod:`bench.report`)."""
    from .report import hardware

    figures = result["results"]
    trip, first = figures["round_trip_2d"], figures["first_partial_3d_box"]
    return [("`medfmsegment serve` on loopback: a 2D prompt on an embedded slice, time added over the "
             "in-process call", f"{trip['added_ms']:.1f} ms ({trip['service_ms']:.1f} vs {trip['in_process_ms']:.1f} ms)",
             hardware(result)),
            ("Same service: a 3D box's first slice on screen / whole result (hippocampus, `propagate`)",
             f"{first['first_update_seconds']:.1f} s / {first['total_seconds']:.1f} s", hardware(result))]


def report_section(result: dict) -> list[str]:
    """The service's part of docs/benchmarks.md (see :mod:`bench.report`)."""
    from .report import _machine_line

    figures = result["results"]
    trip, upload, first = (figures["round_trip_2d"], figures["upload_512x512x300_int16"],
                           figures["first_partial_3d_box"])
    return ["## service", "", f"`python -m bench service` ({_machine_line(result)}): a real `medfmsegment serve` "
            "on 127.0.0.1 against the same calls in process.", "",
            "| measurement | result |", "|---|---|",
            f"| 2D prompt on an embedded slice, through the service / in process (median of {trip['repeats']}) | "
            f"{trip['service_ms']:.1f} ms / {trip['in_process_ms']:.1f} ms ({trip['added_ms']:+.1f} ms) |",
            f"| a bare authenticated request | {trip['bare_request_ms']:.1f} ms |",
            f"| upload of a 512 x 512 x 300 int16 volume ({upload['raw_mb']:.0f} MB) / again (already held) | "
            f"{upload['seconds']:.2f} s / {upload['again_seconds']:.2f} s |",
            f"| zlib level 1 on that volume, as a remote client sends it | {upload['zlib1_seconds']:.1f} s "
            f"({upload['zlib1_mb']:.0f} MB) |",
            f"| 3D box ({result['settings']['volume']}, `{result['settings']['box3d_strategy']}`): first slice update "
            f"/ whole job | {first['first_update_seconds']:.2f} s / {first['total_seconds']:.1f} s |",
            *_during_job_rows(figures), ""]


def _during_job_rows(figures: dict) -> list[str]:
    during = figures.get("round_trip_2d_during_3d_job")
    if not during or during.get("service_ms") is None:
        return []
    return [f"| the same 2D prompt while a 3D box job runs on another volume (median / worst of "
            f"{during['prompts_during_job']}; the job: {during['job_slices']} slices in {during['job_seconds']:.1f} s; "
            f"load {during['load_average_before'][0]:.1f}) | {during['service_ms']:.1f} ms / {during['worst_ms']:.1f} ms |"]
