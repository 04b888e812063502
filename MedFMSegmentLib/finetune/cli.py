"""``medfmsegment finetune``: train an adapter from labelled cases."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError


def _run(args: argparse.Namespace) -> int:
    from ..io import read_image, read_label
    from .adapter_format import check_output_folder, sweep_leftovers
    from .adapters import save_adapter
    from .trainer import FinetuneConfig, check_cases, check_config, finetune

    images, labels = args.image or [], args.label or []
    if not images:
        raise InputError("finetune needs at least one --image IMG --label LBL pair")
    if len(images) != len(labels):
        raise InputError(f"every --image needs its --label ({len(images)} images, {len(labels)} labels)")
    output = Path(args.output)
    check_output_folder(output, args.overwrite)
    try:
        sweep_leftovers(output)  # what an interrupted earlier save left: recovered or removed
    except OSError as exc:
        raise InputError(f"cannot tidy the hidden leftovers beside {output}: {exc.strerror or exc}") from None
    check_output_folder(output, args.overwrite)  # a recovered adapter now counts as existing
    if args.parent is not None:
        from .continual import config_from_parent, load_parent, replay_cases

        parent = load_parent(args.parent)
        overrides = {"device": args.device, "seed": args.seed, "checkpoint": args.checkpoint}
        if args.model is not None:
            overrides["model_name"] = args.model
        for name in ("steps", "embedding_budget"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        config = config_from_parent(parent, **overrides)
        check_config(config)
        old = [] if args.no_replay else replay_cases(parent)
        parent.replayed_cases = len(old)
    else:
        parent, old = None, []
        config = FinetuneConfig(model_name=args.model or "litemedsam", checkpoint=args.checkpoint, device=args.device,
                                steps=args.steps, encoder=args.encoder, lora_rank=args.rank,
                                lora_alpha=2.0 * args.rank, embedding_adapter_channels=args.embedding_adapter,
                                embedding_adapter_scope=args.embedding_adapter_scope,
                                label_value=args.label_value, seed=args.seed,
                                **({} if args.embedding_budget is None else {"embedding_budget": args.embedding_budget}),
                                label_name=args.label_name or (f"label {args.label_value}" if args.label_value
                                                               else "label"))
        check_config(config)
    cases = [(read_image(image_path), read_label(label_path)) for image_path, label_path in zip(images, labels)]
    check_cases(cases, config.label_value)
    from ..progress import finetune_progress

    with finetune_progress() as progress:
        model, metadata = finetune(old + cases, config, progress=progress, parent=parent)
    save_adapter(model, output, metadata)
    replayed = f", {len(old)} of the parent's cases replayed" if parent is not None else ""
    from .comparison import summary_line

    print(f"adapter written to {output} ({summary_line(metadata)}{replayed})", flush=True)
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune a LoRA adapter on a few labelled cases")
    parser.add_argument("--image", action="append", help="training image (repeat, each with its --label)")
    parser.add_argument("--label", action="append", help="label map of the preceding --image")
    parser.add_argument("-o", "--output", required=True, help="adapter folder to write")
    parser.add_argument("--label-value", type=int, default=None, help="label value to learn (default: all non-zero)")
    parser.add_argument("--label-name", default=None)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps, 1 or more (default: 800 with LoRA, 2000 with a frozen encoder; "
                             "with --from, 40%% of the parent's)")
    parser.add_argument("--embedding-budget", type=int, default=None, metavar="N",
                        help="frozen/partial encoder: training slices (with augmented copies) embedded before "
                             "training (default 240)")
    parser.add_argument("--model", default=None, help="base model (default: litemedsam; with --from, the parent's)")
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
    parser.add_argument("--from", dest="parent", default=None, metavar="ADAPTER",
                        help="continue this adapter with the given cases (its settings and base model; "
                             "its own training cases are replayed when their files are still there)")
    parser.add_argument("--no-replay", action="store_true",
                        help="with --from: train on the new cases only")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing adapter at -o (a folder holding other files is refused)")
    parser.set_defaults(handler=_run)
