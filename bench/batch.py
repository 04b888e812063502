"""Batch throughput: cases per minute and seconds per slice, through ``run_batch`` as users run it.

Cases: the N largest ``../shared/data`` hippocampus volumes, each prompted with its label's 3D
bounding box (a prompts JSON, as ``medfmsegment batch --prompts`` takes it), plus the real CT
DICOM series prompted with the bounding box of the largest class in TotalSegmentator's output.

Usage: python -m bench batch [--cases 60] [--device auto] [-o FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from .common import Timer, add_output_option, peak_gpu_mb, peak_rss_mb, save
from .data import HIPPOCAMPUS, bbox3d, ct_case, hippocampus_largest, require_data

from MedFMSegmentLib.batch import BatchSettings, load_prompts_file, run_batch
from MedFMSegmentLib.io import read_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench batch", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--device", default="auto")
    add_output_option(parser)
    args = parser.parse_args(argv)
    require_data()
    images = hippocampus_largest(args.cases)
    prompts = {str(p): {"box": list(bbox3d(read_image(HIPPOCAMPUS / "labelsTr" / p.name).array > 0))} for p in images}
    inputs = [str(p) for p in images]
    ct = ct_case()
    if ct is not None:
        prompts[ct[0].name] = {"box": list(ct[1])}
        inputs.append(str(ct[0]))
    slices = {p: read_image(p).array.shape[0] for p in inputs}
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.json"
        prompt_file.write_text(json.dumps(prompts))
        settings = BatchSettings(device=args.device, prompts=load_prompts_file(prompt_file))
        with Timer() as total:
            results = run_batch(inputs, Path(tmp) / "out", settings,
                                progress=lambda d, n, r: print(f"  {d}/{n} {r.status} {r.seconds:.1f} s",
                                                               file=sys.stderr, flush=True))
    ok = [r for r in results if r.status == "ok"]
    report = {
        "cases": len(results), "ok": len(ok),
        "cases_per_minute": 60.0 * len(results) / total.seconds,
        "seconds_total": total.seconds,
        "seconds_per_slice_median": float(np.median([r.seconds / slices[r.input.replace(" (DICOM series)", "")]
                                                     for r in ok])),
        "ct_series_seconds": next((r.seconds for r in results if "DICOM" in r.input), None),
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu_mb(),
        "backend_setting": settings.backend,
        "note": "prompted with each case's 3D box (axis auto); slices embedded are those the box spans",
    }
    save("batch", report, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
