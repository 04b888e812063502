"""Automatic mode's engine for volumes: the adapter, or a U-Net trained next to it.

On 3D hippocampus MRI a small U-Net trained from scratch on the same few volumes segments them
better without prompts than LiteMedSAM's adapter does, while on 2D ultrasound it is the other way
round (``bench/results/learning_curves.json``). Which one wins depends on the structure, so it is
decided from the data: with enough volumes, some are held out of training
(:func:`held_out_cases`); after the adapter has trained, a MONAI U-Net
(:class:`~.baseline.SegmentationNet`) trains on the same training volumes for the same time, both
segment the held-out volumes without prompts, and the better one becomes automatic mode's engine
(:func:`choose_automatic_net`). A kept U-Net travels in the adapter's weights file (keys
``automatic_net.*``) with its shape in the metadata (``automatic_net``); box and click prompts
always go to LiteMedSAM.
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import InputError
from ..io import MedicalImage
from ..metrics import dice

__all__ = ["AUTOMATIC_NET_MODES", "MIN_CASES", "NET_PREFIX", "held_out_cases", "split_state", "parent_net",
           "choose_automatic_net", "check_net_settings"]

#: ``FinetuneConfig.automatic_net``: "auto" trains and compares the U-Net where it can (volumes,
#: at least :data:`MIN_CASES`, automatic mode trained); "off" never does.
AUTOMATIC_NET_MODES = ("auto", "off")
#: Volumes needed to hold one out and still train on two.
MIN_CASES = 3
NET_PREFIX = "automatic_net."
_NET_LIMITS = {"levels": 8, "channels": 1024, "side": 4096, "patch": 1024}
#: A continued U-Net's learning rate, as a fraction of a first training's (as ``continual.CONTINUE_FRACTION``).
CONTINUE_LR_FRACTION = 0.4


def _is_volume(image: MedicalImage) -> bool:
    return not (image.is_2d or image.geometry.size[2] == 1)


def held_out_cases(cases, config, parent=None) -> list[int]:
    """Indices of the cases whose slices validate instead of training (sorted; may be empty).

    Only where the engine choice runs (``config.automatic_net`` "auto", automatic mode trained)
    and only volumes, from :data:`MIN_CASES` of them: a fraction ``config.validation_fraction``
    (at least one, leaving two to train on). A continued adapter holds out only cases its parent
    trained on (the first ``parent.replayed_cases``), never a new correction. Their own random
    generator, so everything else is drawn as without them. 2D images (one slice each) are held
    out one by one by the trainer's slice split already.
    """
    if (config.automatic_net == "off" or config.automatic_fraction <= 0 or len(cases) < MIN_CASES
            or config.validation_fraction <= 0 or not all(_is_volume(i) for i, _ in cases)):
        return []
    count = min(len(cases) - 2, max(1, int(round(len(cases) * config.validation_fraction))))
    pool = len(cases) if parent is None else min(len(cases), int(parent.replayed_cases))
    if pool < count:
        return []
    order = np.random.default_rng([int(config.seed), 1]).permutation(pool)
    return sorted(int(i) for i in order[:count])


def split_state(state: dict) -> tuple[dict, dict]:
    """An adapter's weights as ``(LiteMedSAM's, the U-Net's)``; the second without the prefix."""
    sam = {k: v for k, v in state.items() if not k.startswith(NET_PREFIX)}
    net = {k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
    return sam, net


def check_net_settings(settings, where: str) -> None:
    """Refuse ``automatic_net`` metadata that would build no sane network (one-line InputError)."""
    def count(value, low, high) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    if settings is None:
        return
    ok = (isinstance(settings, dict) and settings.get("kind") == "monai_unet"
          and settings.get("spatial_dims") in (2, 3) and isinstance(settings.get("channels"), list)
          and 2 <= len(settings["channels"]) <= _NET_LIMITS["levels"]
          and all(count(c, 1, _NET_LIMITS["channels"]) for c in settings["channels"])
          and count(settings.get("image_side", 256), 8, _NET_LIMITS["side"]))
    patch = settings.get("patch") if isinstance(settings, dict) else None
    if ok and patch is not None:
        ok = (settings["spatial_dims"] == 3 and isinstance(patch, list) and len(patch) == 3
              and all(count(p, 1, _NET_LIMITS["patch"]) for p in patch))
    if not ok:
        raise InputError(f"{where}: metadata automatic_net must be null or a MONAI U-Net's settings "
                         "(kind monai_unet, spatial_dims 2 or 3, channels, image_side, patch)")


def parent_net(parent):
    """The parent adapter's U-Net with its weights, or None (a continued U-Net trains on from it)."""
    if parent is None or not parent.metadata.get("automatic_net"):
        return None
    from .baseline import SegmentationNet

    net = SegmentationNet.from_settings(parent.metadata["automatic_net"])
    try:
        net.load_state_dict(split_state(parent.state)[1])
    except RuntimeError:
        raise InputError(f"parent adapter {parent.path}: its U-Net weights do not fit its metadata.json") from None
    return net.eval()


def _mask(label: MedicalImage, label_value) -> np.ndarray:
    return label.array != 0 if label_value is None else label.array == label_value


def _adapter_dice(model, cases, config, cancel) -> float:
    from ..inference import SegmentationSession
    from ..inference.automatic import segment_automatic

    scores = []
    for image, label in cases:
        session = SegmentationSession(model, image, axis=config.axis, intensity=config.intensity)
        mask = segment_automatic(session, keep=config.keep_components, cancel=cancel)
        scores.append(dice(mask, _mask(label, config.label_value)))
    return float(np.mean(scores))


def _net_dice(net, cases, config, cancel) -> float:
    from ..inference.automatic import keep_largest_component
    from ..inference.settings import check_cancel

    scores = []
    for image, label in cases:
        check_cancel(cancel, "fine-tuning")
        mask = net.segment(image, config.intensity)
        if config.keep_components == "largest" and mask.any():
            mask = keep_largest_component(mask)
        scores.append(dice(mask, _mask(label, config.label_value)))
    return float(np.mean(scores))


def choose_automatic_net(model, cases, held_out: list[int], config, seconds: float, parent=None,
                         progress=None, cancel=None) -> tuple[dict | None, dict]:
    """Train the U-Net candidate and keep it on ``model`` (``model.automatic_net``) if it is better.

    Args:
        model: The trained adapter's model (automatic mode without a U-Net: its own decoder).
        cases: Every training case; ``held_out`` indexes those left out of training.
        config: The fine-tuning settings (intensity, label, axis, components, budget, seed).
        seconds: The U-Net's training budget when ``config.automatic_net_seconds`` is None (the
            adapter's own training time: the same time for both).
        parent: A continued adapter: its U-Net, when it has one, trains on from its weights.

    Returns:
        ``(automatic_net settings or None, automatic_engine record)`` for the metadata; the
        record says which engine automatic mode uses, why, and both held-out Dice figures.
    """
    from .baseline import BaselineConfig, train_baseline

    model.automatic_net = None
    if config.automatic_net == "off" or config.automatic_fraction <= 0:
        return None, {"chosen": "adapter", "why": "not asked for"}
    if not all(_is_volume(i) for i, _ in cases):
        return None, {"chosen": "adapter", "why": "2D images: the adapter"}
    initial = parent_net(parent)
    if initial is not None and initial.spatial_dims != 3:
        initial = None
    if not held_out and initial is None:
        return None, {"chosen": "adapter", "why": f"fewer than {MIN_CASES} volumes to hold one out"
                      + (" of the parent's" if parent is not None else "")}
    train = [c for n, c in enumerate(cases) if n not in set(held_out)]
    budget = float(config.automatic_net_seconds or max(1.0, seconds))
    # a continued U-Net learns as a continued adapter does: at a fraction of a first training's rate
    lr = BaselineConfig().lr * (CONTINUE_LR_FRACTION if initial is not None else 1.0)
    last = [-1]

    def report(item: dict) -> None:
        done = min(int(item["seconds"]), int(budget))
        if progress is not None and done != last[0]:
            last[0] = done
            progress({"stage": "automatic_net", "done": done, "total": int(budget)})

    started = time.monotonic()
    trained = train_baseline(train, BaselineConfig(seconds=budget, seed=config.seed, label_value=config.label_value,
                                                   intensity=config.intensity, device=str(model.device), lr=lr),
                             progress=report, cancel=cancel, initial=initial)
    net = trained.net.eval()
    record = {"unet_steps": trained.steps, "unet_seconds": trained.seconds}
    if not held_out:  # a parent's U-Net, already chosen on its own held-out cases, trained further
        model.automatic_net = net
        return net.settings(), {"chosen": "unet", "why": "continued from the parent's U-Net", **record}
    checked = [cases[n] for n in held_out]
    adapter, unet = _adapter_dice(model, checked, config, cancel), _net_dice(net, checked, config, cancel)
    names = [(label.source or image.source or f"case {n}") for n, (image, label) in zip(held_out, checked)]
    record = {**record, "held_out": names, "adapter_dice": round(adapter, 4), "unet_dice": round(unet, 4),
              "check_seconds": round(time.monotonic() - started - trained.seconds, 1)}
    if unet > adapter:
        model.automatic_net = net
        return net.settings(), {"chosen": "unet", "why": "better on the held-out volumes", **record}
    return None, {"chosen": "adapter", "why": "better on the held-out volumes", **record}
