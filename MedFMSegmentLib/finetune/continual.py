"""Continuing an adapter with more cases (``finetune --from``): corrections that feed back.

Training starts from the parent adapter's weights, with the parent's settings (encoder mode,
adapter sizes, intensity, label, axis), for a fraction of a first training's steps. Against
forgetting, the parent's own training cases are replayed with the new ones when its metadata
lists their files and they are still readable: the new adapter then trains on the union, the
new cases last (:attr:`ParentAdapter.replayed_cases` of them come first), and its validation
slices come from old and new cases alike, so the state it keeps is judged on both.
"""
from __future__ import annotations

import os
import threading
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from ..io import MedicalImage, read_image, read_label
from ..preprocessing import IntensitySettings
from .adapter_format import METADATA_DEFAULTS, read_metadata, read_weights, weights_sha256
from .lineage import ParentAdapter
from .trainer import DEFAULT_STEPS, FinetuneConfig, finetune

__all__ = ["CONTINUE_FRACTION", "load_parent", "config_from_parent", "replay_cases", "continue_adapter",
           "update_adapter"]

#: Steps, embedding budget and learning rates of a continuation, as a fraction of a first training's.
CONTINUE_FRACTION = 0.4


def load_parent(path: str | os.PathLike) -> ParentAdapter:
    """Read and check the adapter to continue (its metadata, weights and their SHA-256)."""
    metadata = read_metadata(path)
    state = read_weights(path, metadata)
    return ParentAdapter(str(path), metadata, state, weights_sha256(path))


def config_from_parent(parent: ParentAdapter, **overrides: Any) -> FinetuneConfig:
    """A :class:`FinetuneConfig` that rebuilds the parent's modules and trains less.

    ``overrides``: fields of :class:`FinetuneConfig` to set (e.g. ``steps``, ``seed``, ``device``);
    the settings that shape the adapter come from the parent and cannot be overridden.
    """
    meta = parent.metadata
    lora = meta.get("lora")
    adapter = meta.get("embedding_adapter")
    mode = meta.get("encoder", "lora" if lora else "frozen")
    base = FinetuneConfig()
    shaped = {
        "model_name": meta["base_model"]["name"], "encoder": mode,
        "lora_rank": int(lora.get("rank", 4)) if lora else base.lora_rank,
        "lora_alpha": float(lora.get("alpha", 8.0)) if lora else base.lora_alpha,
        "lora_targets": tuple(lora.get("targets", base.lora_targets)) if lora else base.lora_targets,
        "encoder_stages": tuple(lora["encoder_stages"]) if lora and lora.get("encoder_stages") else None,
        "embedding_adapter_channels": int(adapter["channels"]) if adapter else 0,
        "embedding_adapter_scope": "automatic" if not adapter or adapter.get("prompt_free_only") else "all",
        "intensity": IntensitySettings.from_dict(meta.get("intensity", {})),
        "label_value": meta.get("label_value"),
        **{key: meta.get(key, default) for key, default in METADATA_DEFAULTS.items()},
    }
    fixed = sorted(set(overrides) & (set(shaped) - {"model_name"}))
    if fixed:
        raise InputError(f"a continued adapter keeps its parent's {', '.join(fixed)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(FinetuneConfig)})
    if unknown:
        raise InputError(f"unknown fine-tuning settings: {', '.join(unknown)}")
    steps = int(meta.get("steps_planned") or DEFAULT_STEPS.get(mode, 800))
    config = replace(base, **shaped, steps=max(1, round(steps * CONTINUE_FRACTION)),
                     embedding_budget=max(8, round(base.embedding_budget * CONTINUE_FRACTION)),
                     lr=base.lr * CONTINUE_FRACTION,
                     decoder_lr=float(meta.get("decoder_lr") or 1e-4) * CONTINUE_FRACTION)
    return replace(config, **overrides)


def replay_cases(parent: ParentAdapter) -> list[tuple[MedicalImage, MedicalImage]]:
    """The parent's training cases still readable from the files its metadata names (may be none)."""
    files = (parent.metadata.get("training_cases") or {}).get("files") or []
    cases = []
    for pair in files:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            continue
        try:
            cases.append((read_image(pair[0]), read_label(pair[1])))
        except (InputError, OSError):
            continue  # moved or deleted since: train on what is left
    return cases


def continue_adapter(parent_path: str | os.PathLike, cases: Sequence[tuple[MedicalImage, MedicalImage]],
                     output: str | os.PathLike | None = None, *, replay: bool = True, base_model=None,
                     progress: Callable[[dict], None] | None = None, cancel: threading.Event | None = None,
                     **overrides: Any):
    """Train the adapter at ``parent_path`` further on ``cases`` (and, with ``replay``, its own).

    Returns ``(model, metadata)``; with ``output`` the adapter is also written there (an
    existing adapter is replaced, a folder holding other files refused). ``base_model``: the
    already built base model (else the parent's base model is loaded by name); it must be the
    parent's base (name and SHA-256), else :class:`InputError`.
    """
    from .adapter_format import check_output_folder
    from .adapters import save_adapter

    if output is not None:
        check_output_folder(output, overwrite=True)
    parent = load_parent(parent_path)
    if not cases:
        raise InputError("continuing an adapter needs at least one new case")
    old = replay_cases(parent) if replay else []
    parent.replayed_cases = len(old)
    config = config_from_parent(parent, **overrides)
    model, metadata = finetune(list(old) + list(cases), config, progress=progress, cancel=cancel,
                               base_model=base_model, parent=parent)
    if output is not None:
        save_adapter(model, output, metadata)
    return model, metadata


def _as_image(item: MedicalImage | str | os.PathLike | np.ndarray, reader, like: MedicalImage | None,
              what: str) -> MedicalImage:
    if isinstance(item, MedicalImage):
        return item
    if isinstance(item, np.ndarray):
        if like is None:
            return MedicalImage.from_array(item)
        if item.shape != like.array.shape:
            raise InputError(f"{what} has shape {item.shape}, its image {like.array.shape}")
        return MedicalImage(item, like.geometry, is_2d=like.is_2d, source=like.source)
    return reader(Path(item))


def update_adapter(parent_path: str | os.PathLike, images: Sequence, labels: Sequence,
                   output: str | os.PathLike, **options: Any) -> dict:
    """Add corrected cases to an adapter's training and write the updated adapter (Slicer's
    "Add this case to the training set" + "Update adapter").

    ``images`` / ``labels``: file paths, :class:`MedicalImage`, or ``(K, J, I)`` arrays (a label
    array takes its image's grid). ``output`` may be ``parent_path`` itself: the parent is then
    replaced only once the new adapter is complete. ``options``: as for :func:`continue_adapter`.
    Returns the new adapter's metadata.
    """
    if len(images) != len(labels) or not images:
        raise InputError(f"every image needs its label ({len(images)} images, {len(labels)} labels)")
    cases = []
    for n, (image, label) in enumerate(zip(images, labels)):
        image = _as_image(image, read_image, None, f"image {n}")
        cases.append((image, _as_image(label, read_label, image, f"label {n}")))
    _, metadata = continue_adapter(parent_path, cases, output, **options)
    return metadata
