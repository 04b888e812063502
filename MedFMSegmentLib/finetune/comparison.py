"""Base model and adapted model side by side on the validation slices of a fine-tuning run.

Both are scored the same way as the trainer's validation (mean of box-prompted Dice on the
slices holding the structure and, when the adapter is trained for it, prompt-free Dice on every
validation slice), with the same prompts for both: the tight box of the label on the slice,
without the random offset training boxes get, and no prompt. Dice is
:func:`MedFMSegmentLib.metrics.dice`, at the model's input resolution inside the image. The
figures go into the adapter's metadata (``base_validation_dice``, ``adapted_validation_dice``,
``validation_comparison``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..metrics import dice

__all__ = ["NoJitter", "evaluate", "evaluate_with_state", "evaluate_start", "comparison_metadata", "summary_line", "engine_line", "PROMPTS"]

PROMPTS = "tight box from the label on slices with the structure; no prompt on every slice (automatic)"


class NoJitter:
    """Stands in for the trainer's random generator in box prompts: every offset is zero."""

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.zeros(size) if size is not None else 0.0


def evaluate(model, items: list, forward: Callable, config) -> dict:
    """``{"dice", "box", "automatic"}`` of ``model`` on validation ``items`` (trainer slices or
    cached embeddings, with the trainer's ``forward`` for them); a part is None when no slice
    has it, ``dice`` the mean of the parts present (None without items)."""
    box, automatic = [], []
    with torch.no_grad():
        for item in items:
            if item.has_foreground:
                logits, target = forward(model, item, True, NoJitter(), config, augment=False)
                box.append(dice((logits > 0).cpu().numpy(), target.cpu().numpy() > 0))
            if config.automatic_fraction > 0:
                logits, target = forward(model, item, False, NoJitter(), config, augment=False)
                automatic.append(dice((logits > 0).cpu().numpy(), target.cpu().numpy() > 0))
    parts = {"box": float(np.mean(box)) if box else None,
             "automatic": float(np.mean(automatic)) if automatic else None}
    present = [v for v in parts.values() if v is not None]
    return {"dice": float(np.mean(present)) if present else None, **parts}


def evaluate_with_state(model, state: dict | None, items: list, forward: Callable, config) -> dict:
    """:func:`evaluate` with the trained weights set to ``state`` (e.g. the base model's), the
    model's own weights put back afterwards; ``state`` None: as the model is."""
    from .adapters import load_trained_state, trainable_state

    if state is None:
        return evaluate(model, items, forward, config)
    own = {k: v.clone() for k, v in trainable_state(model).items()}  # on a CPU it shares the weights' storage
    load_trained_state(model, state, "base model")
    try:
        return evaluate(model, items, forward, config)
    finally:
        load_trained_state(model, own, "adapted model")


def evaluate_start(model, items: list, forward: Callable, config, continued: bool) -> tuple[dict | None, dict | None]:
    """``(base, parent)`` figures before training: the base model's (its weights kept aside by
    :func:`.trainer.prepare_model` when continuing, else the model as it starts) and, when
    ``continued``, the parent adapter's; ``(None, None)`` without validation items."""
    base_state = model.__dict__.pop("base_trainable_state", None)
    if not items:
        return None, None
    base = evaluate_with_state(model, base_state, items, forward, config)
    return base, evaluate(model, items, forward, config) if continued else None


def comparison_metadata(base: dict | None, adapted: dict | None, slices: list, parent: dict | None = None,
                        adapted_decoder: dict | None = None) -> dict:
    """The metadata fields of a comparison: both headline figures and the details.
    ``adapted_decoder``: the adapter's figures with its own decoder for boxes, where box prompts
    keep the base model's decoder (``adapted`` is then what the adapter does)."""
    detail = {"prompts": PROMPTS, "slices": [list(map(int, s)) for s in slices], "base": base, "adapted": adapted}
    if parent is not None:
        detail["parent"] = parent
    if adapted_decoder is not None:
        detail["adapted_decoder"] = adapted_decoder
    return {"base_validation_dice": (base or {}).get("dice"), "adapted_validation_dice": (adapted or {}).get("dice"),
            "validation_comparison": detail}


def summary_line(metadata: dict) -> str:
    """``validation Dice 0.812 adapted, 0.701 base model (4 slices)``, or why there are no figures."""
    adapted, base = metadata.get("adapted_validation_dice"), metadata.get("base_validation_dice")
    base_boxes = metadata.get("box_prompts") == "base"
    if adapted is None or base is None:
        boxes = ("box prompts keep the base model's decoder" if base_boxes
                 else "it may segment worse than the base model, box prompts included")
        return (f"no validation slices, so nothing checked the adapter's automatic output ({boxes}); give 3 or more "
                "cases (or more slices with the structure)")
    comparison = metadata.get("validation_comparison") or {}
    count = len(comparison.get("slices") or [])
    checked = (comparison.get("base") or {}).get("box") is not None and \
        (comparison.get("adapted_decoder") or {}).get("box") is not None
    boxes = ("; box prompts keep the base model's decoder, " + ("better with boxes there" if checked else
             "no validation slice held the structure to check boxes")) if base_boxes else ""
    return f"validation Dice {adapted:.3f} adapted, {base:.3f} base model ({count} slices){boxes}" + engine_line(metadata)


def engine_line(metadata: dict) -> str:
    """``; automatic mode: its U-Net, held-out Dice 0.861 against the adapter's 0.802 (1 volume)``
    when the automatic engines were compared, else ""."""
    engine = metadata.get("automatic_engine") or {}
    if not all(isinstance(engine.get(k), (int, float)) for k in ("unet_dice", "adapter_dice")):
        return "; automatic mode: its U-Net, trained on from the parent's" if engine.get("chosen") == "unet" else ""
    mine, other = (("its U-Net", "the adapter's"), ("the adapter", "the U-Net's"))[engine["chosen"] != "unet"]
    first, second = (engine["unet_dice"], engine["adapter_dice"])[::1 if engine["chosen"] == "unet" else -1]
    count = len(engine.get("held_out") or [])
    return (f"; automatic mode: {mine}, held-out Dice {first:.3f} against {other} {second:.3f} "
            f"({count} volume{'s' * (count != 1)})")
