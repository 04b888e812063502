"""Cohort batch throughput: the single-process batch against a Dask LocalCluster of 1 and 2 workers.

Cases: the first N ``../shared/data`` hippocampus volumes, each prompted with its label's box on
``--slices`` slices around the label's middle (a prompts JSON, as ``medfmsegment batch --prompts``
takes it). Every mode segments the same cases into its own folder; masks are compared.

Per mode: start-up (cluster start and model load on every worker; the single process loads its
model once), then the batch itself: cases per minute, and the per-case overhead: the
worker-seconds (wall time x workers) per case not spent in a case's own computing (its
``seconds`` in ``summary.csv``: prompts, segmentation, writing). The cluster's overhead against
the single-process batch is the difference of those per-case overheads.

Usage: python -m bench.cluster [--cases 12] [--slices 2] [--workers 1 2] [--device cpu] [-o FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from .common import machine
    from .data import DATA_DIR
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine  # noqa: E402
    from data import DATA_DIR  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cluster.json"


def _cases(count: int, slices: int) -> tuple[list[str], dict]:
    from MedFMSegmentLib.io import read_image

    folder = DATA_DIR / "msd_hippocampus_mri"
    images = sorted(folder.glob("imagesTr/*.nii.gz"))[:count]
    prompts = {}
    for path in images:
        label = read_image(folder / "labelsTr" / path.name).array > 0
        k0 = int(np.flatnonzero(label.any(axis=(1, 2))).mean()) - slices // 2
        _, j, i = np.nonzero(label[k0:k0 + slices])
        prompts[path.name] = {"box": [int(i.min()), int(j.min()), k0, int(i.max()), int(j.max()), k0 + slices - 1]}
    return [str(p) for p in images], prompts


def _figures(results, wall: float, startup: float, workers: int = 1) -> dict:
    """Throughput and per-case overhead: worker-seconds per case not spent in a case's own computing."""
    computing = [r.seconds for r in results]
    return {"startup_seconds": round(startup, 2), "batch_seconds": round(wall, 2),
            "cases_per_minute": round(60.0 * len(results) / wall, 2),
            "cases_per_minute_with_startup": round(60.0 * len(results) / (wall + startup), 2),
            "case_compute_seconds_mean": round(float(np.mean(computing)), 3),
            "overhead_seconds_per_case": round((wall * workers - float(np.sum(computing))) / len(results), 3),
            "ok": sum(r.status == "ok" for r in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--slices", type=int, default=2, help="box height in slices (encoder passes per case)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", default=str(RESULTS))
    args = parser.parse_args(argv)

    from MedFMSegmentLib.api import load_segmenter
    from MedFMSegmentLib.batch import BatchSettings, load_prompts_file, run_batch
    from MedFMSegmentLib.cohort.cluster import open_cluster
    from MedFMSegmentLib.cohort.distributed import preload, run_batch_on_cluster

    inputs, prompts = _cases(args.cases, args.slices)
    report: dict = {"benchmark": "cluster", "machine_before": machine(), "cases": len(inputs),
                    "slices_per_case": args.slices, "device": args.device, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.json"
        prompt_file.write_text(json.dumps(prompts))
        settings = BatchSettings(device=args.device, prompts=load_prompts_file(prompt_file))
        started = time.perf_counter()
        model, _ = load_segmenter(settings.model_name, device=settings.device)
        startup = time.perf_counter() - started
        started = time.perf_counter()
        single = run_batch(inputs, Path(tmp) / "single", settings, model=model)
        report["modes"]["single_process"] = _figures(single, time.perf_counter() - started, startup)
        print(json.dumps({"single_process": report["modes"]["single_process"]}), file=sys.stderr, flush=True)
        for workers in args.workers:
            started = time.perf_counter()
            with open_cluster(f"local:{workers}") as client:
                loaded = preload(client, settings)
                startup = time.perf_counter() - started
                started = time.perf_counter()
                results = run_batch_on_cluster(inputs, Path(tmp) / f"local{workers}", settings, client)
                wall = time.perf_counter() - started
            figures = _figures(results, wall, startup, workers)
            figures["torch_threads_per_worker"] = sorted({threads for _, threads in loaded.values()})
            figures["same_masks_as_single_process"] = [r.foreground_voxels for r in results] == \
                [r.foreground_voxels for r in single]
            report["modes"][f"local_{workers}"] = figures
            print(json.dumps({f"local_{workers}": figures}), file=sys.stderr, flush=True)
    base = report["modes"]["single_process"]["overhead_seconds_per_case"]
    report["cluster_overhead_seconds_per_case"] = {
        name: round(m["overhead_seconds_per_case"] - base, 3) for name, m in report["modes"].items()
        if name != "single_process"}
    report["machine_after"] = machine()
    report["note"] = ("CPU shared with other work (see load_average before/after); local:N workers get "
                      "cores // N torch threads each, the single process all cores")
    text = json.dumps(report, indent=2)
    print(text)
    from MedFMSegmentLib.files import atomic_write_text

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
