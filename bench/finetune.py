"""Few-shot fine-tuning benchmark: zero-shot box Dice vs adapted box / automatic Dice.

Hippocampus MRI (train on N cases, test on others) and HC18 ultrasound (split by filename prefix).
Usage: python -m bench finetune [--steps N] [--encoder auto|lora|frozen|partial] [--hippo-train 5] [--hippo-test 20]
       [--hc-train 10] [--hc-test 30] [--parts hippocampus,hc18] [--embedding-adapter N] [--seed N]
       [-o FILE]   (default: bench/results/finetune.json)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.inference.automatic import segment_automatic
from MedFMSegmentLib.finetune.trainer import ENCODER_MODES, FinetuneConfig, finetune
from MedFMSegmentLib.loading import load_model
from MedFMSegmentLib.inference import SegmentationSession

from .common import add_output_option, peak_gpu_mb, peak_rss_mb, save
from .data import hc18_split, hippocampus_split, require_data


def _sessions(base, adapted, image, shared: bool):
    """Sessions for the base and adapted models; with a frozen encoder they share embeddings."""
    s0 = SegmentationSession(base, image, axis="axial")
    s1 = SegmentationSession(adapted, image, axis="axial")
    if shared:
        s0.embed_slices(range(s0.num_slices))
        for index in range(s0.num_slices):
            s1.store_embedding(index, s0.embedding(index))
    return s0, s1


def box_dice(session, mask) -> float:
    """A tight box from the label on every slice with foreground (axial), 3D Dice."""
    from MedFMSegmentLib.geometry import slice_from_volume, slice_into_volume

    pred = np.zeros(mask.shape, bool)
    for index in range(session.num_slices):
        plane = slice_from_volume(mask, session.voxel_axis, index)
        if not plane.any():
            continue
        rows, cols = np.nonzero(plane)
        box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
        slice_into_volume(pred, session.voxel_axis, index, session.predict_slice(index, box=box))
    return dice(pred, mask)


def auto_dice(session, mask, refine_iterations: int = 1) -> float:
    pred = segment_automatic(session, refine_iterations=refine_iterations)
    return dice(pred, mask)


def run_part(name, train, test, config: FinetuneConfig, log):
    base = load_model(device=config.device)  # OpenVINO on a CPU when present: the shared embeddings come from it
    started = time.monotonic()

    def report(r):
        if r.get("stage") == "embedding":
            if r["done"] == r["total"] or r["done"] % 20 == 0:
                log(f"{name} embedding {r['done']}/{r['total']} at {time.monotonic() - started:.0f} s")
        elif r.get("stage") == "automatic_net":
            if r["done"] in (0, r["total"]):
                log(f"{name} U-Net candidate {r['done']}/{r['total']} s at {time.monotonic() - started:.0f} s")
        elif r["step"] % 20 == 0 or r["val_dice"] is not None:
            log(f"{name} step {r['step']}/{r['steps']} loss {r['loss']:.4f} val_dice {r['val_dice']} "
                f"at {time.monotonic() - started:.0f} s")

    model, metadata = finetune(train, config, progress=report)
    train_s = time.monotonic() - started
    train_rss = peak_rss_mb()
    shared = metadata["encoder"] == "frozen"
    rows = []
    for image, label in test:
        mask = label.array != 0
        s0, s1 = _sessions(base, model, image, shared)
        row = {"case": Path(image.source).name, "zero_shot_box": box_dice(s0, mask),
               "adapted_box": box_dice(s1, mask), "adapted_auto": auto_dice(s1, mask),
               "adapted_auto_unrefined": auto_dice(s1, mask, refine_iterations=0),
               "adapted_auto_refined_3x": auto_dice(s1, mask, refine_iterations=3)}
        rows.append(row)
        log(f"{name} {row}")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "case"}
    return {"train_cases": len(train), "test_cases": len(test), "encoder": metadata["encoder"],
            "steps": metadata["steps"], "validation_dice": metadata["validation_dice"],
            "embedding_adapter": metadata.get("embedding_adapter"),
            "training_seconds": round(train_s, 1), "peak_rss_mb_after_training": round(train_rss, 1),
            "mean_dice": mean, "cases": rows, "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": peak_gpu_mb()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default: the library's (2000 frozen / 800 LoRA)")
    parser.add_argument("--hippo-train", type=int, default=5)
    parser.add_argument("--hippo-test", type=int, default=20)
    parser.add_argument("--hc-train", type=int, default=10)
    parser.add_argument("--hc-test", type=int, default=30)
    parser.add_argument("--parts", default="hippocampus,hc18")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encoder", default="auto", choices=list(ENCODER_MODES))
    parser.add_argument("--embedding-adapter", type=int, default=None,
                        help="embedding adapter channels (default: the library's, 64 frozen / 0 LoRA; 0: none)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_option(parser)
    args = parser.parse_args(argv)
    require_data()

    def log(line):
        print(line, file=sys.stderr, flush=True)

    result = {              "device": str(load_model(device=args.device, backend="torch").device)}
    config = FinetuneConfig(steps=args.steps, device=args.device, encoder=args.encoder,
                            embedding_adapter_channels=args.embedding_adapter, seed=args.seed)
    result["options"] = {"steps": args.steps, "encoder": args.encoder, "embedding_adapter": args.embedding_adapter,
                         "seed": args.seed}
    if "hippocampus" in args.parts:
        train, test = hippocampus_split(args.hippo_train, args.hippo_test)
        result["hippocampus"] = run_part("hippocampus", train, test, config, log)
        if "hc18" in args.parts:  # a run cut short later (a time-limited GPU) keeps this part's figures
            save("finetune", result, vars(args), args.output)
    if "hc18" in args.parts:
        train, test = hc18_split(args.hc_train, args.hc_test)
        result["hc18"] = run_part("hc18", train, test, config, log)
    save("finetune", result, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
