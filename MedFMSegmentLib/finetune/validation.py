"""Which slices of the training cases validate fine-tuning instead of training it."""
from __future__ import annotations

import numpy as np

__all__ = ["split_validation", "HELD_OUT_SLICES_FACTOR"]

#: Held-out volumes train nothing, so their validation may use this many times
#: ``max_validation_slices``: one volume's few slices are a noisy judge of the box decoder (a
#: 3-volume run kept the base decoder on 6 slices and lost 0.076 box Dice on the test volumes).
HELD_OUT_SLICES_FACTOR = 4


def split_validation(slices: list, held_out: list[int], config, rng: np.random.Generator) -> tuple[list, list, list]:
    """``(training slices with the structure, training slices without it, validation slices)``.

    Validation takes at most ``config.max_validation_slices`` (three quarters with the structure):
    from the held-out cases when there are any (:func:`.automatic_choice.held_out_cases`, spread
    over them at random; :data:`HELD_OUT_SLICES_FACTOR` times as many), else a random ``config.validation_fraction`` of all slices (none when
    fewer than three hold the structure). Training with no structure slice left keeps them all.
    """
    fg = [s for s in slices if s.has_foreground]
    order = rng.permutation(len(slices))
    n_val = int(round(len(slices) * config.validation_fraction)) if config.validation_fraction > 0 else 0
    val_ids = set(order[:n_val].tolist()) if len(fg) > 2 else set()
    if held_out:
        val_ids = {i for i, s in enumerate(slices) if s.case in held_out}
    train = [s for i, s in enumerate(slices) if i not in val_ids]
    val = ([slices[i] for i in order if i in val_ids] if held_out
           else [s for i, s in enumerate(slices) if i in val_ids])
    limit = config.max_validation_slices * (HELD_OUT_SLICES_FACTOR if held_out else 1)
    val_fg = [s for s in val if s.has_foreground][: max(1, limit * 3 // 4)]
    val_bg = [s for s in val if not s.has_foreground][: limit - len(val_fg)]
    train_fg = [s for s in train if s.has_foreground] or fg
    train_bg = [s for s in train if not s.has_foreground]
    return train_fg, train_bg, val_fg + val_bg
