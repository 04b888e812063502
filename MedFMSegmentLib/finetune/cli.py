"""``medfmsegment finetune``: train an adapter from labelled cases."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError


def _progress(report: dict) -> None:
    if report.get("stage") == "embedding":
        done, total = report["done"], report["total"]
        if done == total or done % 10 == 0:
            print(f"embedding training slices {done}/{total}", flush=True)
        return
    line = f"step {report['step']}/{report['steps']} loss {report['loss']:.4f}"
    if report.get("val_dice") is not None:
        line += f" val_dice {report['val_dice']:.3f}"
    print(line, flush=True)


def _run(args: argparse.Namespace) -> int:
    from ..io import read_image, read_label
    from .adapters import save_adapter
    from .trainer import FinetuneConfig, check_cases, finetune

    images, labels = args.image or [], args.label or []
    if not images:
        raise InputError("finetune needs at least one --image IMG --label LBL pair")
    if len(images) != len(labels):
        raise InputError(f"every --image needs its --label ({len(images)} images, {len(labels)} labels)")
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise InputError(f"{output} exists (use --overwrite to replace it)")
    cases = []
    for image_path, label_path in zip(images, labels):
        image, label = read_image(image_path), read_label(label_path)
        cases.append((image, label))
    check_cases(cases, args.label_value)
    config = FinetuneConfig(model_name=args.model, checkpoint=args.checkpoint, device=args.device,
                            steps=args.steps, encoder=args.encoder, lora_rank=args.rank, lora_alpha=2.0 * args.rank,
                            embedding_adapter_channels=args.embedding_adapter,
                            embedding_adapter_scope=args.embedding_adapter_scope,
                            label_value=args.label_value, seed=args.seed,
                            label_name=args.label_name or (f"label {args.label_value}" if args.label_value else "label"))
    model, metadata = finetune(cases, config, progress=_progress)
    save_adapter(model, output, metadata)
    print(f"adapter written to {output} (validation Dice {metadata['validation_dice']})", flush=True)
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune a LoRA adapter on a few labelled cases")
    parser.add_argument("--image", action="append", help="training image (repeat, each with its --label)")
    parser.add_argument("--label", action="append", help="label map of the preceding --image")
    parser.add_argument("-o", "--output", required=True, help="adapter folder to write")
    parser.add_argument("--label-value", type=int, default=None, help="label value to learn (default: all non-zero)")
    parser.add_argument("--label-name", default=None)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: 800 with LoRA, 2000 with a frozen encoder)")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--encoder", default="auto", choices=["auto", "lora", "frozen", "partial"],
                        help="lora: LoRA in the image encoder + decoder; frozen: decoder and an embedding "
                             "adapter on cached embeddings (fast on a CPU); partial: LoRA in the encoder's "
                             "last stage only, earlier stages cached; auto (default): lora on a GPU, "
                             "frozen otherwise")
    parser.add_argument("--embedding-adapter", type=int, default=None, metavar="CHANNELS",
                        help="width of the trainable block between image embedding and decoder; 0: none "
                             "(default: 64 with a frozen encoder, 0 with LoRA)")
    parser.add_argument("--embedding-adapter-scope", default="automatic", choices=["automatic", "all"],
                        help="automatic (default): the embedding adapter acts on prompt-free (automatic) "
                             "segmentation only, box and click prompts see the raw embedding; all: every prompt")
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(handler=_run)
