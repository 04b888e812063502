"""Training an adapter from image and label files into a folder (``medfmsegment finetune``).

Everything checkable is checked before the model loads: the output folder (not a file, not a
folder of other files, an existing adapter only with ``overwrite``, what an interrupted earlier
save left beside it recovered or removed), the settings, then every case (same grid as its label,
the label value present). A new adapter trains from :class:`~.trainer.FinetuneConfig`; with
``parent`` it continues that adapter (:mod:`.continual`), replaying its own cases when asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import InputError
from .trainer import FinetuneConfig

__all__ = ["TrainedAdapter", "prepare_adapter_folder", "train_adapter_from_files"]

PathLike = str | os.PathLike


@dataclass
class TrainedAdapter:
    """What :func:`train_adapter_from_files` wrote."""

    output: Path
    metadata: dict
    replayed_cases: int | None = None  # with a parent: how many of its own cases were replayed


def prepare_adapter_folder(output: PathLike, overwrite: bool = False) -> Path:
    """Check that ``output`` may receive an adapter, after tidying an interrupted save's leftovers."""
    from .adapter_format import check_output_folder, sweep_leftovers

    output = Path(output)
    check_output_folder(output, overwrite)
    try:
        sweep_leftovers(output)  # what an interrupted earlier save left: recovered or removed
    except OSError as exc:
        raise InputError(f"cannot tidy the hidden leftovers beside {output}: {exc.strerror or exc}") from None
    check_output_folder(output, overwrite)  # a recovered adapter now counts as existing
    return output


def train_adapter_from_files(images: Sequence[PathLike], labels: Sequence[PathLike], output: PathLike,
                             config: FinetuneConfig | None = None, *, parent: PathLike | None = None,
                             overrides: Mapping[str, Any] | None = None, replay: bool = True,
                             overwrite: bool = False,
                             progress: Callable[[dict], None] | None = None) -> TrainedAdapter:
    """Train an adapter on ``images[n]`` / ``labels[n]`` and write it to ``output``.

    Args:
        images, labels: Image and label files, in pairs.
        output: The adapter folder (see :func:`prepare_adapter_folder`).
        config: A new adapter's settings (default :class:`FinetuneConfig`); ignored with ``parent``.
        parent: An adapter folder to continue; its settings shape the new one.
        overrides: With ``parent``: the :class:`FinetuneConfig` fields to set (steps, seed, device...).
        replay: With ``parent``: train on its own cases too, where their files are still readable.
        overwrite: Replace an existing adapter at ``output``.
        progress: Called with the trainer's reports (embedding stage, steps, validation Dice).
    """
    from ..io import read_image, read_label
    from .adapters import save_adapter
    from .trainer import check_cases, check_config, finetune

    if not images:
        raise InputError("fine-tuning needs at least one image with its label")
    if len(images) != len(labels):
        raise InputError(f"every image needs its label ({len(images)} images, {len(labels)} labels)")
    output = prepare_adapter_folder(output, overwrite)
    if parent is not None:
        from .continual import config_from_parent, load_parent, replay_cases

        parent_adapter = load_parent(parent)
        config = config_from_parent(parent_adapter, **dict(overrides or {}))
        check_config(config)
        old = replay_cases(parent_adapter) if replay else []
        parent_adapter.replayed_cases = len(old)
    else:
        parent_adapter, old = None, []
        config = config or FinetuneConfig()
        check_config(config)
    cases = [(read_image(image), read_label(label)) for image, label in zip(images, labels)]
    check_cases(cases, config.label_value)
    model, metadata = finetune(old + cases, config, progress=progress, parent=parent_adapter)
    save_adapter(model, output, metadata)
    return TrainedAdapter(output, metadata, len(old) if parent_adapter is not None else None)
