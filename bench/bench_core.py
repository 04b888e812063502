"""Accuracy and speed of prompted segmentation with the embedded LiteMedSAM, on real data.

Prints one JSON object: the machine, then
* HC18 fetal-head ultrasound (2D): Dice from the label's tight box, and from one click at the
  label's centroid (clicks -> box design), over N images;
* MSD hippocampus MRI (3D, whole hippocampus = label > 0): Dice from one 3D box (the label's
  bounding box, segmented with ``--box3d-strategy``, default ``auto`` as in the CLI), and for
  reference a tight box on every slice;
* encoder ms per slice, decoder ms per prompt with a cached embedding, peak RSS.

Usage: python bench/bench_core.py [--hc18 30] [--hippocampus 20] [--device cpu] [-o results.json]
       [--box3d-strategy auto|propagate|consensus] [--offset N] [--no-reference]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA_DIR, emit, Timer, dice, machine, peak_rss_mb  # noqa: E402

from MedFMSegmentLib.io import read_image  # noqa: E402
from MedFMSegmentLib.loading import load_model  # noqa: E402
from MedFMSegmentLib.inference import BOX3D_STRATEGIES, PredictorSettings, SegmentationSession  # noqa: E402
from MedFMSegmentLib.prompts import Prompts, mask_bbox  # noqa: E402


def bench_hc18(model, count: int) -> dict:
    folder = DATA_DIR / "hc18_fetal_head_us"
    names = sorted(p.name[:-4] for p in (folder / "images").glob("*_HC.png"))[:count]
    box_scores, click_scores, encoder_ms, decoder_ms, click_ms = [], [], [], [], []
    for name in names:
        image = read_image(folder / "images" / f"{name}.png")
        truth = read_image(folder / "masks" / f"{name}_mask.png").array[0] > 0
        session = SegmentationSession(model, image)
        with Timer() as t:
            session.embedding(0)
        encoder_ms.append(t.seconds * 1000)
        c0, r0, c1, r1 = (int(v) for v in mask_bbox(truth))
        with Timer() as t:
            mask = session.segment(Prompts(box=(c0, r0, 0, c1, r1, 0)))
        decoder_ms.append(t.seconds * 1000)
        box_scores.append(dice(mask[0], truth))
        rows, cols = np.nonzero(truth)
        with Timer() as t:
            mask = session.segment(Prompts(positives=[(float(cols.mean()), float(rows.mean()), 0.0)]))
        click_ms.append(t.seconds * 1000)
        click_scores.append(dice(mask[0], truth))
    return {"images": len(names), "box_dice_mean": float(np.mean(box_scores)),
            "box_dice_median": float(np.median(box_scores)), "click_dice_mean": float(np.mean(click_scores)),
            "click_dice_median": float(np.median(click_scores)),
            "encoder_ms_per_slice_median": float(np.median(encoder_ms[1:] or encoder_ms)),
            "decoder_ms_per_box_prompt_median": float(np.median(decoder_ms)),
            "click_prompt_ms_median": float(np.median(click_ms))}


def bench_hippocampus(model, count: int, axis: str = "auto", reference: bool = True,
                      strategy: str = "auto", offset: int = 0) -> dict:
    folder = DATA_DIR / "msd_hippocampus_mri"
    names = sorted(p.name for p in (folder / "imagesTr").glob("*.nii.gz"))
    step = max(1, len(names) // count)
    names = names[offset::step][:count]
    box3d, every_slice, seconds = [], [], []
    for name in names:
        image = read_image(folder / "imagesTr" / name)
        truth = read_image(folder / "labelsTr" / name).array > 0
        k, j, i = np.nonzero(truth)
        box = tuple(int(v) for v in (i.min(), j.min(), k.min(), i.max(), j.max(), k.max()))
        session = SegmentationSession(model, image, axis=axis, settings=PredictorSettings(box3d_strategy=strategy))
        with Timer() as t:
            mask = session.segment(Prompts(box=box))
        seconds.append(t.seconds)
        box3d.append(dice(mask, truth))
        if not reference:
            print(f"  {name}: 3D box {box3d[-1]:.3f} (axis {session.axis_for(Prompts(box=box))})", file=sys.stderr, flush=True)
            continue
        session.set_axis("axial")
        every_slice_mask = np.zeros_like(truth)  # not `reference`: that flag is read again next case
        for kk in range(int(k.min()), int(k.max()) + 1):
            tight = mask_bbox(truth[kk])
            if tight is not None:
                every_slice_mask[kk] = session.predict_slice(kk, tight)
        every_slice.append(dice(every_slice_mask, truth))
        print(f"  {name}: 3D box {box3d[-1]:.3f}, every-slice box {every_slice[-1]:.3f}", file=sys.stderr, flush=True)
    return {"cases": len(names), "case_names": names, "axis": axis, "box3d_strategy": strategy,
            "case_offset": offset, "box3d_dice_mean": float(np.mean(box3d)),
            "box3d_dice_median": float(np.median(box3d)),
            "box3d_dice_per_case": [round(float(v), 4) for v in box3d],
            "every_slice_tight_box_dice_mean_axial": float(np.mean(every_slice)) if every_slice else None,
            "seconds_per_case_3d_box_median": float(np.median(seconds))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hc18", type=int, default=30)
    parser.add_argument("--hippocampus", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--axis", default="auto", help="slicing axis for the 3D box (default auto)")
    parser.add_argument("--box3d-strategy", default=PredictorSettings().box3d_strategy, choices=list(BOX3D_STRATEGIES))
    parser.add_argument("--offset", type=int, default=0,
                        help="start of the every-Nth hippocampus case selection (another offset = other cases)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the every-slice tight-box reference (halves the hippocampus time)")
    parser.add_argument("-o", "--output", help="also write the JSON here")
    args = parser.parse_args()
    if not DATA_DIR.is_dir():
        sys.exit(f"data folder {DATA_DIR} not found")
    torch.manual_seed(0)
    model = load_model("litemedsam", device=args.device)
    result = {"benchmark": "core", "machine": machine(), "device": str(model.device), "model": "litemedsam",
              "backend": model.backend, "precision": getattr(model.accelerator, "precision", "f32")}
    if args.hc18 > 0:
        result["hc18"] = bench_hc18(model, args.hc18)
        print(json.dumps(result["hc18"]), file=sys.stderr, flush=True)
    if args.hippocampus > 0:
        result["hippocampus"] = bench_hippocampus(model, args.hippocampus, args.axis, not args.no_reference,
                                                  args.box3d_strategy, args.offset)
    result["peak_rss_mb"] = peak_rss_mb()
    emit(result, args.output)


if __name__ == "__main__":
    main()
