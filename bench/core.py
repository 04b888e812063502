"""Accuracy and speed of prompted segmentation with the embedded LiteMedSAM, on real data.

Saves one JSON object (``bench/results/core.json``): the machine, versions and settings, then
* HC18 fetal-head ultrasound (2D): Dice from the label's tight box, and from one click at the
  label's centroid (clicks -> box design), over N images;
* MSD hippocampus MRI (3D, whole hippocampus = label > 0): Dice from one 3D box (the label's
  bounding box, segmented with ``--box3d-strategy``, default ``auto`` as in the CLI), and for
  reference a tight box on every slice;
* encoder ms per slice, decoder ms per prompt with a cached embedding, peak RSS.

Usage: python -m bench core [--hc18 30] [--hippocampus 20] [--device cpu] [-o FILE]
       [--box3d-strategy auto|propagate|consensus] [--offset N] [--no-reference]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from .common import Timer, add_output_option, peak_rss_mb, save
from .data import bbox3d, hc18_case, hc18_names, hippocampus_case, hippocampus_names, require_data

from MedFMSegmentLib.loading import load_model
from MedFMSegmentLib.inference import BOX3D_STRATEGIES, PredictorSettings, SegmentationSession
from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.prompts import Prompts, mask_bbox


def bench_hc18(model, count: int) -> dict:
    names = hc18_names(count)
    box_scores, click_scores, encoder_ms, decoder_ms, click_ms = [], [], [], [], []
    for name in names:
        image, truth = hc18_case(name)
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
            "click_prompt_ms_median": float(np.median(click_ms)),
            "box_dice_per_case": [round(float(v), 4) for v in box_scores],
            "click_dice_per_case": [round(float(v), 4) for v in click_scores],
            "encoder_ms_each": [round(v, 2) for v in encoder_ms], "decoder_ms_each": [round(v, 2) for v in decoder_ms],
            "click_ms_each": [round(v, 2) for v in click_ms]}


def bench_hippocampus(model, count: int, axis: str = "auto", reference: bool = True,
                      strategy: str = "auto", offset: int = 0) -> dict:
    names = hippocampus_names(count, offset)
    box3d, every_slice, seconds = [], [], []
    for name in names:
        image, truth = hippocampus_case(name)
        box = bbox3d(truth)
        k = np.nonzero(truth)[0]
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
            "seconds_per_case_3d_box_median": float(np.median(seconds)),
            "seconds_per_case_3d_box": [round(v, 2) for v in seconds]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench core", description=__doc__.splitlines()[0])
    parser.add_argument("--hc18", type=int, default=30)
    parser.add_argument("--hippocampus", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--axis", default="auto", help="slicing axis for the 3D box (default auto)")
    parser.add_argument("--box3d-strategy", default=PredictorSettings().box3d_strategy, choices=list(BOX3D_STRATEGIES))
    parser.add_argument("--offset", type=int, default=0,
                        help="start of the every-Nth hippocampus case selection (another offset = other cases)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the every-slice tight-box reference (halves the hippocampus time)")
    add_output_option(parser)
    args = parser.parse_args(argv)
    require_data()
    torch.manual_seed(0)
    model = load_model("litemedsam", device=args.device)
    result = {"device": str(model.device), "model": "litemedsam",
              "backend": model.backend, "precision": getattr(model.accelerator, "precision", "f32")}
    if args.hc18 > 0:
        result["hc18"] = bench_hc18(model, args.hc18)
        print(json.dumps(result["hc18"]), file=sys.stderr, flush=True)
    if args.hippocampus > 0:
        result["hippocampus"] = bench_hippocampus(model, args.hippocampus, args.axis, not args.no_reference,
                                                  args.box3d_strategy, args.offset)
    result["peak_rss_mb"] = peak_rss_mb()
    save("core", result, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
