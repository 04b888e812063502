"""Batch throughput: cases per minute and seconds per slice, through ``run_batch`` as users run it.

Cases: the N largest ``../shared/data`` hippocampus volumes, each prompted with its label's 3D
bounding box (a prompts JSON, as ``medfmsegment batch --prompts`` takes it), plus the real CT
DICOM series prompted with the bounding box of the largest class in TotalSegmentator's output.

Usage: python bench/bench_batch.py [--cases 60] [--device auto] [-o results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA_DIR, emit, Timer, machine, peak_gpu_mb, peak_rss_mb  # noqa: E402

from MedFMSegmentLib.batch import BatchSettings, load_prompts_file, run_batch  # noqa: E402
from MedFMSegmentLib.io import read_image  # noqa: E402


def _bbox(mask: np.ndarray) -> list[int]:
    k, j, i = np.nonzero(mask)
    return [int(i.min()), int(j.min()), int(k.min()), int(i.max()), int(j.max()), int(k.max())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--device", default="auto")
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    hippo = DATA_DIR / "msd_hippocampus_mri"
    images = sorted(hippo.glob("imagesTr/*.nii.gz"), key=lambda p: -int(np.prod(read_image(p).array.shape)))
    images = images[: args.cases]
    prompts = {str(p): {"box": _bbox(read_image(hippo / "labelsTr" / p.name).array > 0)} for p in images}
    inputs = [str(p) for p in images]
    ct = DATA_DIR / "ct_dicom_totalsegmentator"
    if (ct / "example_ct_dicom").is_dir():
        seg = read_image(ct / "example_seg_dicom.nii.gz").array.astype(int)
        labels, counts = np.unique(seg[seg > 0], return_counts=True)
        prompts["example_ct_dicom"] = {"box": _bbox(seg == labels[np.argmax(counts)])}
        inputs.append(str(ct / "example_ct_dicom"))
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
        "benchmark": "batch", "machine": machine(), "cases": len(results), "ok": len(ok),
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
    emit(report, args.output)


if __name__ == "__main__":
    main()
