"""LoRA fine-tuning of a SAM-family model on a few labelled cases."""
from __future__ import annotations

import datetime
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CancelledError, InputError
from ..geometry import slice_from_volume
from ..io import MedicalImage
from ..metrics import dice
from .. import loading
from ..models import PromptableModel, resolve_device
from ..preprocessing import IntensitySettings, SliceTransform, normalize_intensity
from .adapter_format import LIMITS, METADATA_DEFAULTS, model_identity
from .augment import augment_slice as _augment, jittered_box as _box
from .box_prompts import base_decoder_copy, choose_box_prompts, use_base_prompt_decoder
from .comparison import comparison_metadata, evaluate, evaluate_start
from .adapters import add_embedding_adapter, check_base, inject_lora, is_trained, load_trained_state, trainable_state
from .automatic_choice import AUTOMATIC_NET_MODES, choose_automatic_net, held_out_cases, split_state
from .validation import split_validation
from .encoder_split import check_first_stage, encode_head, encode_tail
from .lineage import ParentAdapter, case_files, lineage

__all__ = ["FinetuneConfig", "check_cases", "check_config", "finetune", "prepare_model",
           "resolve_encoder_mode", "DEFAULT_STEPS", "EMBEDDING_ADAPTER_SCOPES", "ENCODER_MODES"]
MAX_STEPS = 1_000_000
# Defaults per encoder mode (FinetuneConfig.steps / decoder_lr = None): a frozen encoder makes a
# step far cheaper, so it gets more steps (figures: docs/benchmarks.md).
DEFAULT_STEPS = {"lora": 800, "frozen": 2000, "partial": 800}
DEFAULT_DECODER_LR = {"lora": 1e-4, "frozen": 3e-4, "partial": 1e-4}
DEFAULT_EMBEDDING_ADAPTER = {"lora": 0, "frozen": 64, "partial": 64}
ENCODER_MODES = ("auto", "lora", "frozen", "partial")
EMBEDDING_ADAPTER_SCOPES = ("automatic", "all")  # FinetuneConfig.embedding_adapter_scope
# "partial": LoRA in these TinyViT stages only (the last: 2 of its 12 blocks), earlier ones cached
PARTIAL_STAGES = (3,)


@dataclass
class FinetuneConfig:
    model_name: str = "litemedsam"
    checkpoint: str | None = None
    device: str = "auto"
    steps: int | None = None  # None: DEFAULT_STEPS of the encoder mode
    batch_size: int = 1
    # "lora", "frozen" (decoder only, cached embeddings), "partial" (LoRA in the last encoder
    # stage, its input cached) or "auto" (see resolve_encoder_mode)
    encoder: str = "auto"
    # frozen encoder: slice embeddings computed; flipped, then augmented copies fill what slices leave
    # (on HC18, better automatic and box Dice than the slices alone)
    embedding_budget: int = 240
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_targets: tuple = ("qkv", "proj")
    encoder_stages: tuple | None = None  # None: every stage ("partial": PARTIAL_STAGES); e.g. (2, 3)
    embedding_adapter_channels: int | None = None  # None: DEFAULT_EMBEDDING_ADAPTER of the mode; 0: none
    # "automatic": the embedding adapter acts on prompt-free decoding only (box prompts see the raw
    # embedding: better box Dice on both benchmark parts); "all": every decoder call.
    embedding_adapter_scope: str = "automatic"
    # bfloat16 autocast of LoRA steps ("lora", "partial") on a CPU; None: where it computes bf16 natively
    cpu_bf16_autocast: bool | None = None
    lr: float = 3e-4  # LoRA and embedding-adapter weights
    decoder_lr: float | None = None  # None: DEFAULT_DECODER_LR of the encoder mode
    label_value: int | None = None
    label_name: str = METADATA_DEFAULTS["label_name"]
    seed: int = 0
    validation_fraction: float = 0.2
    max_validation_slices: int = 8
    validate_every: int = 100  # as in the benchmarks; with patience 4 early stopping waits 400 steps
    augment: bool = True
    early_stopping_patience: int = 4
    # Validation checks before this fraction of the planned steps neither become the saved state
    # nor count towards early stopping: prompt-free output rises late, and a tiny validation set
    # can rate an early step best.
    select_after_fraction: float = 0.5
    automatic_fraction: float = 0.5
    foreground_fraction: float = 0.8
    box_jitter: float = 0.1
    axis: str = METADATA_DEFAULTS["axis"]
    intensity: IntensitySettings = field(default_factory=IntensitySettings)
    keep_components: str = METADATA_DEFAULTS["keep_components"]
    # automatic mode's engine for volumes (see .automatic_choice): "auto" also trains a U-Net from
    # scratch and keeps it when held-out volumes show it better; "off": the adapter alone
    automatic_net: str = "auto"
    automatic_net_seconds: float | None = None  # the U-Net's budget; None: the adapter's training time


@dataclass
class _Slice:
    image: np.ndarray  # normalised 2D slice
    mask: np.ndarray  # bool 2D
    pixel_size: tuple
    case: int
    axis: int = 2  # voxel axis and index of the slice in its case's volume
    index: int = 0

    @property
    def has_foreground(self) -> bool:
        return bool(self.mask.any())


def check_cases(cases, label_value) -> None:
    if not cases:
        raise InputError("fine-tuning needs at least one image with its label")
    for n, (image, label) in enumerate(cases):
        name = label.source or f"case {n}"
        if not image.geometry.same_grid(label.geometry):
            raise InputError(f"image and label grids differ for {name}: "
                             + image.geometry.describe_difference(label.geometry))
        values = label.array
        if label_value is None:
            if not np.any(values != 0):
                raise InputError(f"label {name} has no foreground")
        elif not np.any(values == label_value):
            present = sorted(int(v) for v in np.unique(values) if v != 0)
            raise InputError(f"label value {label_value} does not occur in {name} (values: {present})")


def check_config(config: FinetuneConfig) -> None:
    """Refuse settings that cannot train (before any model is loaded)."""
    if config.steps is not None and (isinstance(config.steps, bool) or not 1 <= int(config.steps) <= MAX_STEPS):
        raise InputError(f"training steps must be from 1 to {MAX_STEPS}, got {config.steps}")
    if not 1 <= config.embedding_budget <= 100_000:
        raise InputError(f"embedding budget must be from 1 to 100000, got {config.embedding_budget}")
    if not 1 <= config.lora_rank <= LIMITS["lora_rank"]:
        raise InputError(f"LoRA rank must be from 1 to {LIMITS['lora_rank']}, got {config.lora_rank}")
    channels = config.embedding_adapter_channels
    if channels is not None and not 0 <= channels <= LIMITS["embedding_adapter_channels"]:
        raise InputError(f"embedding adapter channels must be from 0 to {LIMITS['embedding_adapter_channels']}, "
                         f"got {channels}")
    if config.embedding_adapter_scope not in EMBEDDING_ADAPTER_SCOPES:
        raise InputError(f"embedding adapter scope must be automatic or all, got {config.embedding_adapter_scope!r}")
    if config.encoder not in ENCODER_MODES:
        raise InputError(f"encoder mode must be one of {', '.join(ENCODER_MODES)}, got {config.encoder!r}")
    if config.automatic_net not in AUTOMATIC_NET_MODES:
        raise InputError(f"automatic net must be auto or off, got {config.automatic_net!r}")
    seconds = config.automatic_net_seconds
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not 0 < seconds <= 86_400):
        raise InputError(f"the automatic net's training time must be from 1 s to a day, got {seconds}")


def _load_base(config: FinetuneConfig, mode: str, base_model: PromptableModel | None) -> PromptableModel:
    if base_model is not None:
        return base_model
    # Training needs autograd, which only PyTorch gives; a frozen encoder only embeds, so it may
    # run on the accelerated backend, while the decoder, about to be trained, stays in PyTorch
    # (load_adapted_model later runs a frozen-encoder adapter on this same encoder graph).
    model = loading.load_model(config.model_name, config.checkpoint, config.device, backend="torch")
    if mode == "frozen":
        from ..backends import accelerate, default_backend

        accelerate(model, default_backend(), parts=("encoder",))
    return model


def _slices(cases, config: FinetuneConfig) -> list[_Slice]:
    from ..geometry import in_plane_axes

    out = []
    for n, (image, label) in enumerate(cases):
        volume = normalize_intensity(image.array, config.intensity, image.modality)
        mask = label.array != 0 if config.label_value is None else label.array == config.label_value
        axis = 2 if image.geometry.size[2] == 1 else image.geometry.voxel_axis_for(config.axis)
        rows, cols = in_plane_axes(axis)
        spacing = image.geometry.spacing
        for index in range(image.geometry.size[axis]):
            out.append(_Slice(slice_from_volume(volume, axis, index), slice_from_volume(mask, axis, index),
                              (spacing[rows], spacing[cols]), n, axis, index))
    return out


def _forward(model: PromptableModel, item: _Slice, box: bool, rng, config, augment: bool):
    image, mask = item.image, item.mask
    if augment:
        image, mask = _augment(image, mask, rng)
    t = SliceTransform.create(image.shape[0], image.shape[1], model.image_size, item.pixel_size)
    device = model.device
    x = t.image_to_input(image)[None].to(device)
    target = t.mask_to_input(mask).to(device)
    boxes = _box(target, rng, config.box_jitter if augment else 0.0).to(device) if (box and target.any()) else None
    embedding = model.encode(x)
    logits, _ = model.decode(embedding, boxes=boxes)
    logits = F.interpolate(logits.float(), size=target.shape, mode="bilinear", align_corners=False)
    valid = (slice(0, t.new_rows), slice(0, t.new_cols))
    return logits[0, 0][valid], target[valid]


@dataclass
class _Embedded:
    """A slice already through the frozen image encoder (or its frozen head, see
    :mod:`.encoder_split`), with its target at model-input resolution."""

    embedding: torch.Tensor  # (1, C, 64, 64), or the head's output when first_stage is set
    target: torch.Tensor  # (S, S) float, 1 = structure
    valid: tuple  # (rows, cols) of the image inside the padded input
    has_foreground: bool
    first_stage: int | None = None  # "partial": the encoder stage that takes ``embedding``


@torch.no_grad()
def _embed(model: PromptableModel, item: _Slice, flip: bool, augment_seed: int | None = None,
           first_stage: int | None = None) -> _Embedded:
    """Embed one slice, horizontally flipped or not, or randomly augmented (``augment_seed``: the
    MONAI transforms of :func:`_augment`, which flip on their own). With ``first_stage``, keep
    what that encoder stage receives instead of the embedding."""
    if augment_seed is not None:
        image, mask = _augment(item.image, item.mask, np.random.default_rng(augment_seed))
    else:
        image, mask = (item.image[:, ::-1], item.mask[:, ::-1]) if flip else (item.image, item.mask)
    t = SliceTransform.create(image.shape[0], image.shape[1], model.image_size, item.pixel_size)
    x = t.image_to_input(np.ascontiguousarray(image))[None].to(model.device)
    target = t.mask_to_input(np.ascontiguousarray(mask)).to(model.device)
    if first_stage is None:
        return _Embedded(model.encode(x).detach(), target, (t.new_rows, t.new_cols), bool(mask.any()))
    features = encode_head(model.image_encoder, model.normalize(x), first_stage).detach()
    return _Embedded(features, target, (t.new_rows, t.new_cols), bool(mask.any()), first_stage)


def _forward_embedded(model: PromptableModel, item: _Embedded, box: bool, rng, config, augment: bool):
    """Decoder (and, for "partial", encoder-tail) forward: the prompt (jittered box or none) is the
    only augmentation left."""
    target = item.target
    boxes = _box(target, rng, config.box_jitter if augment else 0.0).to(model.device) \
        if (box and item.has_foreground) else None
    embedding = (item.embedding if item.first_stage is None
                 else encode_tail(model.image_encoder, item.embedding, item.first_stage))
    logits, _ = model.decode(embedding, boxes=boxes)
    logits = F.interpolate(logits.float(), size=target.shape, mode="bilinear", align_corners=False)
    rows, cols = item.valid
    return logits[0, 0][:rows, :cols], target[:rows, :cols]


def _plan_embeddings(train_fg: list, train_bg: list, budget: int, foreground_fraction: float, augment: bool,
                     rng: np.random.Generator) -> list[tuple[_Slice, bool, int | None]]:
    """Which (slice, flipped, augmentation seed) triples to embed within ``budget``: foreground
    first, some background, then horizontally flipped copies while the budget lasts, then (few
    slices, as with 2D cases) randomly augmented copies until the budget is used."""
    fg = [train_fg[i] for i in rng.permutation(len(train_fg))]
    bg = [train_bg[i] for i in rng.permutation(len(train_bg))]
    n_bg = min(len(bg), int(round(budget * (1 - foreground_fraction))))
    n_fg = min(len(fg), budget - n_bg)
    n_bg = min(len(bg), budget - n_fg)
    originals = fg[:n_fg] + bg[:n_bg]
    plan = [(s, False, None) for s in originals]
    if augment:
        plan += [(s, True, None) for s in originals[:max(0, budget - len(plan))]]
        # The frozen encoder sees only what was embedded: with ten 2D images, flips alone leave
        # twenty views for thousands of decoder steps.
        while originals and len(plan) < budget:
            for s in originals[:budget - len(plan)]:
                plan.append((s, False, int(rng.integers(2**31))))
    return plan


def resolve_encoder_mode(config: FinetuneConfig, device: torch.device) -> str:
    """``lora`` on a GPU; ``frozen`` (decoder only) on a CPU.

    A LoRA step back-propagates through the whole encoder, so on a CPU few steps fit a
    15-minute budget; with the encoder frozen each training slice is embedded once and only the
    decoder (and embedding adapter) trains. ``partial`` (LoRA in the last TinyViT stage, earlier
    stages cached) is asked for by name only. Figures: ``docs/adaptation.md``.
    """
    if config.encoder not in ENCODER_MODES:
        raise InputError(f"encoder mode must be one of {', '.join(ENCODER_MODES)}, got {config.encoder!r}")
    if config.encoder != "auto":
        return config.encoder
    return "lora" if device.type == "cuda" else "frozen"


def prepare_model(config: FinetuneConfig, mode: str, base_model: PromptableModel | None = None,
                  parent: ParentAdapter | None = None) -> tuple[PromptableModel, list[str], tuple | None, int]:
    """The model about to train: base weights frozen, LoRA / embedding adapter added, the
    parent's weights loaded when continuing. Returns ``(model, lora layers, stages, channels)``."""
    adapter_channels = (DEFAULT_EMBEDDING_ADAPTER[mode] if config.embedding_adapter_channels is None
                        else config.embedding_adapter_channels)
    model = _load_base(config, mode, base_model)
    # The base's identity before any surgery (of its tensors when it was not loaded from a file).
    model.weights_sha256 = model_identity(model)
    if parent is not None:
        check_base(parent.metadata, model, f"parent adapter {parent.path}")
    for p in model.parameters():
        p.requires_grad_(False)
    encoder_stages = config.encoder_stages
    if mode == "partial":
        encoder_stages = tuple(encoder_stages or PARTIAL_STAGES)
        check_first_stage(model.image_encoder, min(encoder_stages))
    targets = (inject_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets, encoder_stages)
               if mode in ("lora", "partial") else [])
    if adapter_channels > 0:
        add_embedding_adapter(model, adapter_channels, config.embedding_adapter_scope == "automatic")
    model.to(model.pixel_mean.device)
    if parent is not None:
        # for the base model's validation figure (cloned: on a CPU trainable_state shares the weights' storage)
        model.base_trainable_state = {k: v.clone() for k, v in trainable_state(model).items()}
        load_trained_state(model, split_state(parent.state)[0], f"parent adapter {parent.path}")
    for name, p in model.named_parameters():
        p.requires_grad_(is_trained(name))
    model.eval()
    return model, targets, encoder_stages, adapter_channels


def finetune(cases: list[tuple[MedicalImage, MedicalImage]], config: FinetuneConfig | None = None,
             progress=None, cancel: threading.Event | None = None, base_model: PromptableModel | None = None,
             parent: ParentAdapter | None = None):
    """Fine-tune the mask decoder, with LoRA in the encoder's attention or the encoder frozen.

    Returns ``(model, metadata)``. ``config.encoder`` picks the mode (see
    :func:`resolve_encoder_mode`): with a frozen encoder each sampled slice is embedded once and
    the decoder trains on the cached embeddings, with jittered box prompts, empty prompts
    (automatic mode), horizontally flipped copies and, when slices are few (2D cases), randomly
    augmented copies up to ``embedding_budget`` as augmentation. There an
    :class:`~MedFMSegmentLib.finetune.adapters.EmbeddingAdapter` (``embedding_adapter_channels``,
    64 by default) trains with the decoder, since the frozen encoder cannot adapt the features
    themselves; by default it acts on prompt-free decoding only (``embedding_adapter_scope``).

    ``base_model``: an already built base model to train (changed in place) instead of loading
    ``config.model_name``. ``parent``: continue that adapter (see :mod:`.continual`); training
    starts from its weights and the metadata records the lineage.

    The model stays in eval mode throughout (BatchNorm statistics frozen, no dropout), so the
    saved adapter reloads to exactly the trained outputs.
    """
    config = config or FinetuneConfig()
    check_config(config)
    check_cases(cases, config.label_value)
    start = time.monotonic()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    mode = resolve_encoder_mode(config, resolve_device(config.device))
    model, targets, encoder_stages, adapter_channels = prepare_model(config, mode, base_model, parent)
    prompt_free_only = config.embedding_adapter_scope == "automatic"
    base_name, base_sha = model.spec.name, model.weights_sha256
    steps = config.steps or DEFAULT_STEPS[mode]
    decoder_lr = config.decoder_lr or DEFAULT_DECODER_LR[mode]

    slices = _slices(cases, config)
    held_out = held_out_cases(cases, config, parent)
    train_fg, train_bg, val = split_validation(slices, held_out, config, rng)
    val_slices = [(s.case, s.axis, s.index) for s in val]
    forward = _forward
    if mode in ("frozen", "partial"):
        first_stage = min(encoder_stages) if mode == "partial" else None
        plan = [(s, False, None) for s in val] + _plan_embeddings(
            train_fg, train_bg, max(1, config.embedding_budget - min(len(val), config.max_validation_slices)),
            config.foreground_fraction,
            config.augment, rng)
        embedded = []
        for n, (item, flip, augment_seed) in enumerate(plan):
            if cancel is not None and cancel.is_set():
                raise CancelledError("fine-tuning cancelled")
            embedded.append(_embed(model, item, flip, augment_seed, first_stage))
            if progress is not None:
                progress({"stage": "embedding", "done": n + 1, "total": len(plan)})
        val, rest = embedded[:len(val)], embedded[len(val):]
        train_fg = [e for e in rest if e.has_foreground] or train_fg
        train_bg = [e for e in rest if not e.has_foreground]
        forward = _forward_embedded

    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(sigmoid=True)
    # The added weights (LoRA, embedding adapter) learn at ``lr``, the pretrained decoder at ``decoder_lr``.
    added = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("mask_decoder.")]
    dec_params = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("mask_decoder.")]
    groups = [{"params": added, "lr": config.lr}, {"params": dec_params, "lr": decoder_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    use_amp = model.device.type == "cuda"
    # bfloat16 autocast on a CPU that computes it natively: LoRA and last-stage ("partial") steps
    # run faster than in float32 (python -m bench perf --finetune-only; figures in
    # docs/benchmarks.md). The frozen mode's decoder-only steps stay in float32.
    if model.device.type == "cpu" and mode in ("lora", "partial"):
        from ..backends import cpu_has_native_bf16

        cpu_bf16 = cpu_has_native_bf16() if config.cpu_bf16_autocast is None else config.cpu_bf16_autocast
    else:
        cpu_bf16 = False

    def validate() -> float:
        """Mean of box-prompted Dice (slices with the structure) and, when trained for it,
        prompt-free Dice (all validation slices): both ways the adapter will be used."""
        if not val:
            return float("nan")
        box_scores, auto_scores = [], []
        with torch.no_grad():
            for item in val:
                if item.has_foreground:
                    logits, target = forward(model, item, True, rng, config, augment=False)
                    box_scores.append(dice((logits > 0).cpu().numpy(), target.cpu().numpy() > 0))
                if config.automatic_fraction > 0:
                    logits, target = forward(model, item, False, rng, config, augment=False)
                    auto_scores.append(dice((logits > 0).cpu().numpy(), target.cpu().numpy() > 0))
        return float(np.mean([np.mean(scores) for scores in (box_scores, auto_scores) if scores]))

    # The base model's decoder, for box prompts should validation not show the adapted one better
    # (frozen encoder only: LoRA changes the embedding the base decoder would need)
    base_decoder = base_decoder_copy(model, getattr(model, "base_trainable_state", None)) if mode == "frozen" else None
    if parent is not None and parent.metadata.get("box_prompts") == "base":
        use_base_prompt_decoder(model, base_decoder)  # the parent's figures as it is used
    # The base model (and a parent) on the slices and prompts the adapted model gets at the end
    base_figures, parent_figures = evaluate_start(model, val, forward, config, parent is not None)
    model.prompt_decoder = None  # training and its validation: the decoder being trained
    best_dice, best_state, best_step, bad_checks, val_dice, steps_done = -1.0, None, None, 0, float("nan"), 0
    first_eligible = min(steps, int(steps * config.select_after_fraction))  # the last step always counts
    for step in range(1, steps + 1):
        if cancel is not None and cancel.is_set():
            raise CancelledError("fine-tuning cancelled")
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(config.batch_size):
            use_fg = not train_bg or rng.random() < config.foreground_fraction
            pool = train_fg if use_fg else train_bg
            item = pool[int(rng.integers(len(pool)))]
            auto = rng.random() < config.automatic_fraction
            with torch.autocast("cuda", enabled=use_amp), torch.autocast("cpu", torch.bfloat16, enabled=cpu_bf16):
                logits, target = forward(model, item, not auto, rng, config, augment=config.augment)
            loss = loss_fn(logits.float()[None, None], target[None, None]) / config.batch_size
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        scheduler.step()
        steps_done = step
        report = {"step": step, "steps": steps, "loss": total, "val_dice": None,
                  "base_val_dice": (base_figures or {}).get("dice")}
        if val and (step % config.validate_every == 0 or step == steps):
            val_dice = validate()
            report["val_dice"] = val_dice
            if step >= first_eligible:
                if val_dice > best_dice:
                    best_dice, best_state, best_step, bad_checks = val_dice, trainable_state(model), step, 0
                else:
                    bad_checks += 1
        if progress is not None:
            progress(report)
        if config.early_stopping_patience and bad_checks >= config.early_stopping_patience:
            break
    if best_state is not None:
        device = model.device
        model.load_state_dict({k: v.to(device) for k, v in best_state.items()}, strict=False)
    model.eval()
    adapted_figures = evaluate(model, val, forward, config) if val else None
    box_prompts, own_decoder_figures = choose_box_prompts(mode, base_figures, adapted_figures), None
    if box_prompts == "base":
        use_base_prompt_decoder(model, base_decoder)
        if adapted_figures is not None:  # the figures of what the adapter will do; the adapted decoder's kept
            own_decoder_figures, adapted_figures = adapted_figures, evaluate(model, val, forward, config)
    automatic_net, automatic_engine = choose_automatic_net(model, cases, held_out, config, time.monotonic() - start,
                                                           parent, progress, cancel)
    from .. import __version__

    names = [(label.source or image.source or f"case {n}") for n, (image, label) in enumerate(cases)]
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    metadata = {
        "format": 2 if automatic_net else 1,  # readers of format 1 alone would not know the U-Net
        "base_model": {"name": base_name, "sha256": base_sha},
        "label_name": config.label_name,
        "label_value": config.label_value,
        "intensity": config.intensity.to_dict(),
        "axis": config.axis,
        "training_cases": {"count": len(cases), "names": names, "files": case_files(cases)},
        "steps": steps_done,
        "steps_planned": steps,
        "decoder_lr": decoder_lr,
        "validation_dice": None if best_dice < 0 else best_dice,
        "best_step": best_step,
        "validation_slices": len(val),
        "library_version": __version__,
        "date": date,
        "encoder": mode,
        "lora": {"rank": config.lora_rank, "alpha": config.lora_alpha, "targets": list(config.lora_targets),
                 "encoder_stages": list(encoder_stages) if encoder_stages is not None else None,
                 "layers": len(targets)} if mode in ("lora", "partial") else None,
        "embedding_adapter": {"channels": adapter_channels,
                              "prompt_free_only": prompt_free_only}
        if adapter_channels > 0 else None,
        "automatic": config.automatic_fraction > 0,
        "box_prompts": box_prompts,
        "automatic_net": automatic_net,
        "automatic_engine": automatic_engine,
        "keep_components": config.keep_components,
        "seed": config.seed,
        "training_seconds": round(time.monotonic() - start, 1),
        "device": str(model.device),
        "cpu_bfloat16_autocast": cpu_bf16,
        "lineage": lineage(parent, names, date),
        **comparison_metadata(base_figures, adapted_figures, val_slices, parent_figures, own_decoder_figures),
    }
    return model, metadata

