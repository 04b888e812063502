"""3D from one box, fast: strategies compared on cached embeddings, then the finalists timed for real.

For N MSD hippocampus cases (box = the label's bounding box) every slice of the box along each
axis is embedded once and kept on disk (:mod:`bench.box3d_cache`). Each strategy variant then runs
on a session that already holds them, so it costs decoding only; the suite counts the slices it
asked for (what it would have embedded) and prints, per case and as means, its Dice, that count,
its decoding seconds and the estimated seconds (count x the encoder's median seconds per slice,
timed on three slices per case in this run, + decoding). Then, on every ``--time-every``-th
case, the ``segment`` path of the old default (consensus) and of ``sparse`` is timed on a fresh session (nothing cached) in the same run, with
the time to the prompted slice's mask (the first ``on_update``) and the load average around each.

Usage: python -m bench box3d_speed [--hippocampus 20] [--time-every 4] [-o FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from .box3d_cache import cached_session, embed_box_slices
from .common import add_output_option, peak_rss_mb, save
from .data import bbox3d, hippocampus_case, hippocampus_names, require_data

from MedFMSegmentLib.geometry import axes_by_extent
from MedFMSegmentLib.inference import PredictorSettings, SegmentationSession
from MedFMSegmentLib.inference.propagate import propagate_box_logits
from MedFMSegmentLib.loading import load_model
from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.prompts import Prompts


def _segment(strategy: str, **fields):
    def run(session: SegmentationSession, box):
        session.settings = PredictorSettings(box3d_strategy=strategy, **fields)
        return session.segment(Prompts(box=box))
    return run


def _propagate_on(which: int):
    def run(session: SegmentationSession, box):
        session.settings = PredictorSettings()
        axis = axes_by_extent(box, session.image.geometry.spacing)[which]
        return propagate_box_logits(session.along(axis), box, session.image.geometry.shape) > 0
    return run


#: name -> run(session, box) -> mask; ``consensus`` is the old default for these boxes.
VARIANTS = {
    "consensus": _segment("consensus"),
    "consensus_rounds_6_0": _segment("consensus", consensus_three_axis_rounds=0),
    "propagate_shortest": _propagate_on(0),
    "sparse": _segment("sparse"),
    "sparse_stride2": _segment("sparse", sparse_stride=2),
    "sparse_stride3": _segment("sparse", sparse_stride=3),
    "sparse_no_rebox": _segment("sparse", sparse_rebox_after=6),
    "sparse_rounds12_rebox6": _segment("sparse", sparse_rounds=12, sparse_rebox_after=6),
}


def encoder_seconds(model, image, box) -> list[float]:
    """Seconds of the encoder on the box's middle slice along each axis (nothing cached)."""
    session = SegmentationSession(model, image)
    seconds = []
    for axis in (0, 1, 2):
        index = (int(box[axis]) + int(box[axis + 3])) // 2
        start = time.perf_counter()
        session.embedding_along(axis, index)
        seconds.append(time.perf_counter() - start)
    return seconds


def timed_segment(model, image, box, strategy: str) -> dict:
    """Wall time of ``segment`` on a fresh session, time to its first slice, load average around it."""
    session = SegmentationSession(model, image, settings=PredictorSettings(box3d_strategy=strategy))
    first: list[float] = []
    load_before = os.getloadavg()[0]
    start = time.perf_counter()

    def on_update(axis, index, plane):
        if not first:
            first.append(time.perf_counter() - start)

    mask = session.segment(Prompts(box=box), on_update=on_update)
    seconds = time.perf_counter() - start
    return {"mask": mask, "seconds": round(seconds, 3), "first_slice_s": round(first[0], 3),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def report_section(result: dict) -> list[str]:
    """The suite's part of ``docs/benchmarks.md`` (``python -m bench report``)."""
    load = result["machine"]["load_average"]
    out = ["## box3d_speed", "",
           f"3D box strategies on {result['cases']} hippocampus cases (`python -m bench box3d_speed`), decoded "
           f"from embeddings stored once; estimated seconds = slices embedded x {result['encoder_s_per_slice_median']:.3f} s "
           f"(the encoder's median in this run) + decoding; load average {load[0]:.2f} at the end.", "",
           "| Variant | Dice | Slices embedded | Decoding (s) | Estimated (s) |", "|---|---|---|---|---|"]
    for name, row in result["summary"].items():
        out.append(f"| {name} | {row['dice_mean']:.3f} | {row['embeddings_mean']:.1f} | {row['decode_s_mean']:.2f} | "
                   f"{row['estimated_s_mean']:.1f} |")
    out += ["", "The `segment` path timed on a fresh session, same run:", "",
            "| Strategy | Cases | Dice | Seconds per case | First slice (s) | Load before/after |", "|---|---|---|---|---|---|"]
    for name, entry in result["real"].items():
        out.append(f"| {name} | {len(entry['case'])} | {np.mean(entry['dice']):.3f} | {np.mean(entry['seconds']):.1f} | "
                   f"{np.mean(entry['first_slice_s']):.2f} | {np.mean(entry['load_before']):.2f}/"
                   f"{np.mean(entry['load_after']):.2f} |")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench box3d_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--hippocampus", type=int, default=20)
    parser.add_argument("--offset", type=int, default=0, help="start of the every-Nth case selection")
    parser.add_argument("--limit", type=int, default=None, help="only the first N of those cases")
    parser.add_argument("--variants", default="all", help="comma-separated variant names (default all)")
    parser.add_argument("--time-every", type=int, default=4, help="time the real segment path on every Nth case "
                                                                 "(0: never)")
    parser.add_argument("--timed", default="consensus,sparse", help="strategies timed for real")
    add_output_option(parser)
    args = parser.parse_args(argv)
    require_data()
    torch.manual_seed(0)
    model = load_model("litemedsam")
    names = hippocampus_names(args.hippocampus, args.offset)[:args.limit]
    variants = VARIANTS if args.variants == "all" else {v: VARIANTS[v] for v in args.variants.split(",")}
    timed = args.timed.split(",")
    encode_seconds: list[float] = []
    rows: dict[str, dict[str, list]] = {}
    real: dict[str, dict[str, list]] = {}
    for n, name in enumerate(names):
        image, truth = hippocampus_case(name)
        box = bbox3d(truth)
        embed_box_slices(model, name, image, box)
        encode_seconds += encoder_seconds(model, image, box)
        session = cached_session(model, name, image)
        line = []
        for variant, run in variants.items():
            session.used.clear()
            start = time.perf_counter()
            mask = run(session, box)
            decode_s = time.perf_counter() - start
            row = rows.setdefault(variant, {"dice": [], "embeddings": [], "decode_s": []})
            row["dice"].append(round(dice(mask, truth), 4))
            row["embeddings"].append(len(session.used))
            row["decode_s"].append(round(decode_s, 3))
            line.append(f"{variant} {row['dice'][-1]:.3f}/{row['embeddings'][-1]}")
        print(f"  {name}: " + ", ".join(line), file=sys.stderr, flush=True)
        if args.time_every and n % args.time_every == 0:
            for strategy in timed:
                out = timed_segment(model, image, box, strategy)
                entry = real.setdefault(strategy, {"case": [], "dice": [], "seconds": [], "first_slice_s": [],
                                                   "load_before": [], "load_after": []})
                entry["case"].append(name)
                entry["dice"].append(round(dice(out.pop("mask"), truth), 4))
                for key, value in out.items():
                    entry[key].append(value)
                print(f"  {name} real {strategy}: {entry['seconds'][-1]:.1f} s, first slice "
                      f"{entry['first_slice_s'][-1]:.2f} s, Dice {entry['dice'][-1]:.3f}, load "
                      f"{entry['load_before'][-1]}-{entry['load_after'][-1]}", file=sys.stderr, flush=True)
    per_slice = float(np.median(encode_seconds))
    summary = {}
    for variant, row in rows.items():
        summary[variant] = {"dice_mean": round(float(np.mean(row["dice"])), 4),
                            "embeddings_mean": round(float(np.mean(row["embeddings"])), 1),
                            "decode_s_mean": round(float(np.mean(row["decode_s"])), 3)}
        summary[variant]["estimated_s_mean"] = round(summary[variant]["embeddings_mean"] * per_slice
                                                         + summary[variant]["decode_s_mean"], 2)
    for strategy, entry in real.items():
        print(f"real {strategy}: {np.mean(entry['seconds']):.1f} s per case on {len(entry['case'])} cases",
              file=sys.stderr)
    result = {"device": str(model.device), "backend": model.backend,
              "precision": getattr(model.accelerator, "precision", "f32"),
              "cases": len(names), "case_names": names, "case_offset": args.offset,
              "encoder_s_per_slice_median": per_slice, "encoder_slices_timed": len(encode_seconds),
              "summary": summary, "per_case": rows, "real": real, "peak_rss_mb": peak_rss_mb()}
    save("box3d_speed", result, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
