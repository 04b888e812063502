"""Fine-tuning with and without one option, same splits, encoder and seed: automatic and box Dice.

Made to compare the frozen-encoder fine-tuning with and without its embedding adapter
(``FinetuneConfig.embedding_adapter_channels``): each run is appended, under its tag, to the
``runs`` list of ``bench/results/adapter_pairs.json``. Test-case embeddings are
computed once with the base model's encoder (the one frozen-encoder training uses) and cached
under ``--cache``; the adapted model decodes them, as ``python -m bench finetune`` does.

Usage: python -m bench adapter_pairs --part hc18|hippocampus --tag NAME --config '{"embedding_adapter_channels": 0, "seed": 1}'
Splits: hippocampus cases 1-5 train, the next 20 test; HC18 the first 10 prefixes train (10
images), 30 images of the others test: ``python -m bench finetune``'s splits.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .common import RESULTS_DIR, add_output_option, machine, save
from .data import hc18_split, hippocampus_split
from .finetune import auto_dice, box_dice

from MedFMSegmentLib.finetune.adapters import save_adapter
from MedFMSegmentLib.finetune.trainer import FinetuneConfig, finetune
from MedFMSegmentLib.loading import load_model
from MedFMSegmentLib.inference import SegmentationSession


def test_embeddings(test, cache: Path, mirrored: bool = False) -> list[list[torch.Tensor]]:
    """Each test case's slice embeddings by the base model's encoder, read from ``cache`` or computed
    (and saved there) with the base model, which is loaded only when a case is missing.
    ``mirrored``: of each slice flipped left-right (``SegmentationSession.mirrored``), cached apart."""
    cache = cache.with_name(cache.name + "_mirrored") if mirrored else cache
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    base = None
    for image, _ in test:
        path = cache / (Path(image.source).name + ".pt")
        if not path.exists():
            if base is None:
                base = load_model()
            session = SegmentationSession(base, image, axis="axial")
            session = session.mirrored() if mirrored else session
            torch.save([session.embedding(i).half() for i in range(session.num_slices)], path)
        out.append(torch.load(path, weights_only=True))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench adapter_pairs", description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["hippocampus", "hc18"], required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--config", default="{}", help="FinetuneConfig fields as JSON")
    parser.add_argument("--cache", default="/tmp/medfmsegment_bench_embeddings")
    parser.add_argument("--save-adapter", default=None, help="also save the trained adapter in this folder")
    add_output_option(parser)
    args = parser.parse_args(argv)
    train, test = hippocampus_split(5, 20) if args.part == "hippocampus" else hc18_split(10, 30)
    config = json.loads(args.config)
    embeddings = test_embeddings(test, Path(args.cache) / args.part)
    validation = []
    started = time.monotonic()
    model, metadata = finetune(train, FinetuneConfig(**config),
                               progress=lambda r: validation.append(r["val_dice"]) if r.get("val_dice") is not None else None)
    train_s = time.monotonic() - started
    if args.save_adapter:
        save_adapter(model, Path(args.save_adapter), metadata)
    scores = []
    for (image, label), case_embeddings in zip(test, embeddings):
        session = SegmentationSession(model, image, axis="axial")
        for index, embedding in enumerate(case_embeddings):
            session.store_embedding(index, embedding.float())
        mask = label.array != 0
        scores.append((auto_dice(session, mask), box_dice(session, mask)))
    scores = np.array(scores)
    run = {"tag": args.tag, "part": args.part, "config": config, "auto": round(float(scores[:, 0].mean()), 4),
           "box": round(float(scores[:, 1].mean()), 4), "train_s": round(train_s, 1),
           "steps": metadata["steps"], "val": [round(v, 3) for v in validation], "machine": machine()}
    path = Path(args.output) if args.output and args.output != "-" else RESULTS_DIR / "adapter_pairs.json"
    runs = json.loads(path.read_text(encoding="utf-8")).get("runs", []) if path.is_file() and args.output != "-" else []
    save("adapter_pairs", {"runs": runs + [run]}, vars(args), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
