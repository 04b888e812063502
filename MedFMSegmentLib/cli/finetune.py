"""``medfmsegment finetune``: train an adapter from labelled cases, or continue one (``--from``).

:func:`config_from_args` and :func:`overrides_from_args` turn the flags into the trainer's
settings; :func:`run` hands them to :func:`~MedFMSegmentLib.finetune.from_files.train_adapter_from_files`.
"""

from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

from ..errors import InputError
from .options import EXIT_OK, add_device_option, add_server_options

if TYPE_CHECKING:
    from ..finetune.trainer import FinetuneConfig

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "config_from_args", "overrides_from_args"]

HELP = "fine-tune a LoRA adapter on a few labelled cases"
DESCRIPTION = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..finetune.automatic_choice import AUTOMATIC_NET_MODES
    from ..finetune.continual import CONTINUE_FRACTION
    from ..finetune.trainer import (DEFAULT_EMBEDDING_ADAPTER, DEFAULT_STEPS, EMBEDDING_ADAPTER_SCOPES, ENCODER_MODES,
                                    FinetuneConfig)
    from ..models import MODEL_SPECS

    defaults = FinetuneConfig()
    parser.add_argument("--image", action="append", help="training image (repeat, each with its --label)")
    parser.add_argument("--label", action="append", help="label map of the preceding --image")
    parser.add_argument("-o", "--output", required=True, help="adapter folder to write")
    parser.add_argument("--label-value", type=int, default=None, help="label value to learn (default: all non-zero)")
    parser.add_argument("--label-name", default=None,
                        help="the structure's name, saved with the adapter (default: 'label' or 'label N')")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps, 1 or more (default: {DEFAULT_STEPS['lora']} with LoRA, "
                             f"{DEFAULT_STEPS['frozen']} with a frozen encoder; with --from, "
                             f"{CONTINUE_FRACTION * 100:.0f}%% of the parent's)")
    parser.add_argument("--embedding-budget", type=int, default=None, metavar="N",
                        help="frozen/partial encoder: training slices (with augmented copies) embedded before "
                             f"training (default {defaults.embedding_budget})")
    # No choices here: the loader checks the name, so a model registered by a test or plug-in trains too.
    parser.add_argument("--model", default=None,
                        help=f"base model: {', '.join(MODEL_SPECS)} (default: {defaults.model_name}; "
                             "with --from, the parent's)")
    parser.add_argument("--checkpoint", default=None, help="weights file of a SAM/MedSAM base model")
    add_device_option(parser)
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"random seed of sampling and augmentation (default {defaults.seed})")
    parser.add_argument("--rank", type=int, default=defaults.lora_rank,
                        help=f"LoRA rank (default {defaults.lora_rank}; alpha is twice the rank)")
    parser.add_argument("--encoder", default=defaults.encoder, choices=list(ENCODER_MODES),
                        help="lora: LoRA in the image encoder + decoder; frozen: decoder and an embedding "
                             "adapter on cached embeddings (fast on a CPU); partial: LoRA in the encoder's "
                             "last stage only, earlier stages cached; auto: lora on a GPU, frozen otherwise "
                             f"(default {defaults.encoder})")
    parser.add_argument("--embedding-adapter", type=int, default=None, metavar="CHANNELS",
                        help="width of the trainable block between image embedding and decoder; 0: none "
                             f"(default: {DEFAULT_EMBEDDING_ADAPTER['frozen']} with a frozen encoder, "
                             f"{DEFAULT_EMBEDDING_ADAPTER['lora']} with LoRA)")
    parser.add_argument("--embedding-adapter-scope", default=defaults.embedding_adapter_scope,
                        choices=list(EMBEDDING_ADAPTER_SCOPES),
                        help="automatic: the embedding adapter acts on prompt-free (automatic) segmentation "
                             "only, box and click prompts see the raw embedding; all: every prompt "
                             f"(default {defaults.embedding_adapter_scope})")
    parser.add_argument("--automatic-net", default=None, choices=list(AUTOMATIC_NET_MODES),
                        help="auto: with 3 or more volumes, a fifth of them (at least one) is held out and a MONAI "
                             "U-Net trained next to the adapter becomes automatic mode's engine when it segments "
                             "the held-out volumes better (about twice the training time); off: the adapter alone "
                             f"(default {defaults.automatic_net})")
    parser.add_argument("--from", dest="parent", default=None, metavar="ADAPTER",
                        help="continue this adapter with the given cases (its settings and base model; "
                             "its own training cases are replayed when their files are still there)")
    parser.add_argument("--no-replay", action="store_true",
                        help="with --from: train on the new cases only")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing adapter at -o (a folder holding other files is refused)")
    add_server_options(parser, "train on a running 'medfmsegment serve' at this URL (its device and models; the "
                               "adapter also stays there)")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """A new adapter's :class:`FinetuneConfig` from the flags."""
    from ..finetune.trainer import FinetuneConfig

    budget = {} if args.embedding_budget is None else {"embedding_budget": args.embedding_budget}
    return FinetuneConfig(model_name=args.model or FinetuneConfig().model_name, checkpoint=args.checkpoint,
                          device=args.device, steps=args.steps, encoder=args.encoder, lora_rank=args.rank,
                          lora_alpha=2.0 * args.rank, embedding_adapter_channels=args.embedding_adapter,
                          embedding_adapter_scope=args.embedding_adapter_scope, label_value=args.label_value,
                          seed=args.seed, automatic_net=args.automatic_net or FinetuneConfig().automatic_net,
                          **budget,
                          label_name=args.label_name or (f"label {args.label_value}" if args.label_value
                                                         else "label"))


def overrides_from_args(args: argparse.Namespace) -> dict:
    """With ``--from``: the settings the flags change; the rest come from the parent adapter."""
    overrides = {"device": args.device, "seed": args.seed, "checkpoint": args.checkpoint}
    if args.model is not None:
        overrides["model_name"] = args.model
    for name in ("steps", "embedding_budget", "automatic_net"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return overrides


def run(args: argparse.Namespace) -> int:
    from ..finetune.comparison import summary_line
    from ..finetune.from_files import train_adapter_from_files
    from ..progress import finetune_progress

    images, labels = args.image or [], args.label or []
    if not images:
        raise InputError("finetune needs at least one --image IMG --label LBL pair")
    if len(images) != len(labels):
        raise InputError(f"every --image needs its --label ({len(images)} images, {len(labels)} labels)")
    if args.server:
        return run_on_service(args, images, labels)
    if args.parent is not None:
        config, overrides = None, overrides_from_args(args)
    else:
        config, overrides = config_from_args(args), None
    with finetune_progress() as progress:
        trained = train_adapter_from_files(images, labels, args.output, config, parent=args.parent,
                                           overrides=overrides, replay=not args.no_replay, overwrite=args.overwrite,
                                           progress=progress)
    replayed = "" if trained.replayed_cases is None else f", {trained.replayed_cases} of the parent's cases replayed"
    print(f"adapter written to {trained.output} ({summary_line(trained.metadata)}{replayed})", flush=True)
    return EXIT_OK


def run_on_service(args: argparse.Namespace, images: list, labels: list) -> int:
    """``finetune --server URL``: the same training on a service (:mod:`..service.remote_finetune`)."""
    from ..finetune.comparison import summary_line
    from ..progress import finetune_progress
    from ..service.remote_finetune import finetune_remote

    if args.checkpoint is not None:
        raise InputError("--checkpoint cannot be sent to a service: it serves the models it was started with")
    settings = {"model": args.model, "steps": args.steps, "encoder": args.encoder, "rank": args.rank,
                "embedding_adapter_channels": args.embedding_adapter,
                "embedding_adapter_scope": args.embedding_adapter_scope, "label_value": args.label_value,
                "seed": args.seed, "embedding_budget": args.embedding_budget, "automatic_net": args.automatic_net,
                "label_name": args.label_name or (f"label {args.label_value}" if args.label_value else "label")}
    if args.parent is not None:  # as overrides_from_args: the parent's settings shape the rest
        settings = {"model": args.model, "steps": args.steps, "seed": args.seed,
                    "embedding_budget": args.embedding_budget, "automatic_net": args.automatic_net}

    def started(job: str, name: str) -> None:
        print(f"fine-tuning job {job} on {args.server} (adapter {name} there)", flush=True)

    with finetune_progress() as progress:
        output, metadata = finetune_remote(images, labels, args.output, server=args.server, token_file=args.token_file,
                                           overwrite=args.overwrite, settings=settings, parent=args.parent,
                                           replay=not args.no_replay, progress=progress, on_started=started)
    replayed = "" if args.parent is None else \
        f", {metadata['lineage'][-1]['cases_replayed']} of the parent's cases replayed"
    print(f"adapter written to {output} ({summary_line(metadata)}{replayed})", flush=True)
    return EXIT_OK
