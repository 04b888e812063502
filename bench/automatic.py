"""Automatic-mode settings on a saved adapter: mean 3D Dice per box threshold, re-prompt count and box scales.

Decoder-only: the test cases' embeddings come from the ``python -m bench adapter_pairs`` cache (the base
encoder's, which frozen-encoder adapters decode), so one adapter is scored under many settings
in minutes. Train and save the adapter first, e.g.
``python -m bench adapter_pairs --part hc18 --tag T --save-adapter /tmp/adapter_hc18``.

Usage: python -m bench automatic --part hc18|hippocampus --adapter DIR
       [--thresholds default,0,-1] [--refine 1,2] [--scales default,1] [--flips default,0,1] [-o FILE]
``default`` is the library's value for the part's kind (``AUTOMATIC_DEFAULTS`` of a volume or a 2D
image); a scale set is ``default`` or factors joined by ``/`` (``1``: the mask's own box only);
a flip is 0 or 1 (test-time flip; the mirrored slices' embeddings are cached as well).
Also prints the seconds each setting took over all cases (decoding only: embeddings are cached).
Splits: ``python -m bench finetune``'s test cases (hippocampus: the 20 after the first 5; HC18: 30 images).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from .adapter_pairs import test_embeddings
from .common import add_output_option, save
from .data import hc18_split, hippocampus_split

from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.finetune.adapters import load_adapted_model
from MedFMSegmentLib.inference.automatic import AUTOMATIC_DEFAULTS, segment_automatic
from MedFMSegmentLib.inference import SegmentationSession


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench automatic", description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["hippocampus", "hc18"], required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--thresholds", default="default,0,-1")
    parser.add_argument("--refine", default="default,1,2")
    parser.add_argument("--scales", default="default,1")
    parser.add_argument("--flips", default="default")
    parser.add_argument("--cache", default="/tmp/medfmsegment_bench_embeddings")
    add_output_option(parser)
    args = parser.parse_args(argv)
    thresholds = [None if v == "default" else float(v) for v in args.thresholds.split(",")]
    refines = [None if v == "default" else int(v) for v in args.refine.split(",")]
    flips = [None if v == "default" else bool(int(v)) for v in args.flips.split(",")]
    scale_sets = [None if v == "default" else tuple(float(f) for f in v.split("/")) for v in args.scales.split(",")]
    _, test = hippocampus_split(5, 20) if args.part == "hippocampus" else hc18_split(10, 30)
    embeddings = test_embeddings(test, Path(args.cache) / args.part)
    flip_default = AUTOMATIC_DEFAULTS["volume" if args.part == "hippocampus" else "image"].flip
    mirrored = (test_embeddings(test, Path(args.cache) / args.part, mirrored=True)
                if any(flips) or (None in flips and flip_default) else [None] * len(test))
    model, info = load_adapted_model(Path(args.adapter), device="cpu")
    scores: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for (image, label), case_embeddings, mirrored_embeddings in zip(test, embeddings, mirrored):
        session = SegmentationSession(model, image, axis="axial")
        for index, embedding in enumerate(case_embeddings):
            session.store_embedding(index, embedding.float())
        for index, embedding in enumerate(mirrored_embeddings or []):
            session.mirrored().store_embedding(index, embedding.float())
        truth = label.array != 0
        for threshold in thresholds:
            for refine in refines:
                for scales in scale_sets:
                    for flip in flips:
                        started = time.perf_counter()
                        pred = segment_automatic(session, refine_iterations=refine, box_threshold=threshold,
                                                 box_scales=scales, flip=flip)
                        name = (f"threshold {'default' if threshold is None else f'{threshold:g}'}, "
                                f"refine {'default' if refine is None else refine}, "
                                f"scales {'default' if scales is None else '/'.join(f'{f:g}' for f in scales)}, "
                                f"flip {'default' if flip is None else int(flip)}")
                        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
                        scores.setdefault(name, []).append(
                            dice(pred, truth))
    result = {"part": args.part, "adapter": str(args.adapter),
              "adapter_seed": info.metadata.get("seed"), "adapter_steps": info.metadata.get("steps"),
              "library_defaults": {kind: dataclasses.asdict(v) for kind, v in AUTOMATIC_DEFAULTS.items()},
              "mean_dice": {k: round(float(np.mean(v)), 4) for k, v in scores.items()},
              "seconds_all_cases": {k: round(v, 1) for k, v in seconds.items()},
              "cases": {k: [round(float(x), 4) for x in v] for k, v in scores.items()}}
    save("automatic", result, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
