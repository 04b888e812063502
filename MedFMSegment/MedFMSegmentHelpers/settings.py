"""Qt-free choices of the panel: the models (and which need weights), unset paths, the library's path,
the line that sums up a fine-tuning run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

__all__ = ["MODEL_CHOICES", "ensure_library_on_path", "path_or_none", "model_availability", "adaptation_summary",
           "validation_figures", "adapter_details", "training_line"]

#: (registry name, label, needs a checkpoint file). LiteMedSAM's weights ship with the library.
MODEL_CHOICES = (
    ("litemedsam", "LiteMedSAM", False),
    ("medsam_vit_b", "MedSAM (ViT-B)", True),
    ("sam_vit_b", "SAM (ViT-B)", True),
    ("sam_vit_l", "SAM (ViT-L)", True),
    ("sam_vit_h", "SAM (ViT-H)", True),
)


def ensure_library_on_path() -> None:
    """Make ``import MedFMSegmentLib`` work from a source checkout as well as from an installed extension."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here, here.parent):
        if (candidate / "MedFMSegmentLib" / "__init__.py").is_file():
            if str(candidate) not in sys.path:
                sys.path.insert(0, str(candidate))
            return


def path_or_none(value) -> Optional[str]:
    """A parameter node Path as a string, None when unset (an unset Path reads as '.')."""
    text = str(value) if value is not None else ""
    return None if text in ("", ".") else text


def model_availability(checkpoint) -> list[tuple[str, str, bool, str]]:
    """``(name, label, enabled, reason)`` of each model; models needing weights are disabled
    until an existing checkpoint file is chosen."""
    path = path_or_none(checkpoint)
    has_file = bool(path) and Path(path).is_file()
    result = []
    for name, label, needs in MODEL_CHOICES:
        enabled = not needs or has_file
        reason = "" if enabled else "needs a checkpoint file (Setup: Checkpoint)"
        result.append((name, label, enabled, reason))
    return result


def validation_figures(metadata: dict) -> tuple:
    """``(adapted, base)`` validation Dice of an adapter's metadata: both on the same slices and
    prompts (``adapted_validation_dice``; older adapters: the figure training kept), None when not measured."""
    metadata = metadata or {}
    adapted = metadata.get("adapted_validation_dice", metadata.get("validation_dice"))
    return adapted, metadata.get("base_validation_dice")


def automatic_refusal(metadata: dict | None) -> str:
    """Why an adapter cannot segment without prompts ("" when it can, or its metadata is unknown):
    one trained for box prompts only would fail on every volume of a batch."""
    if metadata is None or metadata.get("automatic", True):
        return ""
    return ("This adapter was trained for box prompts only; fine-tune one with automatic mode "
            "to segment without prompts.")


def held_out_figures(metadata: dict) -> str:
    """`` (held-out Dice U-Net 0.861, adapter 0.802)`` when the adapter's engines were compared, else ""."""
    engine = (metadata or {}).get("automatic_engine") or {}
    figures = (engine.get("unet_dice"), engine.get("adapter_dice")) if isinstance(engine, dict) else (None, None)
    if not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in figures):
        return ""
    return f" (held-out Dice U-Net {engine['unet_dice']:.3f}, adapter {engine['adapter_dice']:.3f})"


def adapter_details(metadata: dict) -> str:
    """One line of an adapter's metadata for the adapter list: base model, Dice (adapted and base), steps..."""
    metadata = metadata or {}
    adapted, base = validation_figures(metadata)
    parts = [f"base: {(metadata.get('base_model') or {}).get('name')}"] if metadata.get("base_model") else []
    if metadata.get("label_name"):
        parts.append(f"label: {metadata['label_name']}")
    if adapted is not None:
        parts.append(f"validation Dice {adapted:.3f}" + (f" (base model {base:.3f})" if base is not None else ""))
    parts += [f"{key}: {metadata[key]}" for key in ("steps", "encoder") if metadata.get(key) is not None]
    if metadata.get("box_prompts") == "base":
        parts.append("box prompts: the base model's decoder")
    if metadata.get("automatic_net"):
        parts.append("automatic mode: its U-Net" + held_out_figures(metadata))
    cases = (metadata.get("training_cases") or {}).get("count")
    if cases:
        parts.append(f"training cases: {cases}")
    if metadata.get("lineage"):
        parts.append(f"updates: {len(metadata['lineage'])}")
    if metadata.get("date"):
        parts.append(f"date: {metadata['date']}")
    return "; ".join(parts)


def training_line(stage: str, done: int, planned: int, metrics: dict) -> str:
    """The status line while training, with the last validation Dice beside the base model's
    ("" before the first validation)."""
    metrics = metrics or {}
    val, base = metrics.get("val_dice"), metrics.get("base_val_dice")
    if stage == "automatic_net":
        return f"training a U-Net for automatic mode: {done} of {planned} s"
    if stage != "training" or val is None:
        return ""
    line = f"training: step {done} of {planned}; validation Dice {val:.3f}"
    return line + (f" (base model {base:.3f})" if base is not None else "")


def adaptation_summary(result: dict) -> str:
    """The line shown when fine-tuning ends: the adapter and its validation Dice, base model beside it."""
    metadata = (result or {}).get("metadata", {}) or {}
    adapted, base = validation_figures(metadata)
    text = f"Adapter '{result.get('adapter', '?')}' written"
    if adapted is not None:
        text += f"; validation Dice adapted {adapted:.3f}"
        text += f" vs base model {base:.3f}" if base is not None else " (base model not measured)"
    count = (metadata.get("training_cases") or {}).get("count")
    return text + (f" on {count} training case(s)." if count else ".")
