"""What the service's requests do: parse a request's fields, then prompt, segment or fine-tune.

Every request field is checked against a fixed list (an unknown field is refused, so no field
can smuggle a path in), and every value against its type. A prompt on one slice is answered in
the request (:func:`segment_2d`); a 3D prompt, automatic segmentation and fine-tuning are jobs
(:func:`prompt_job`, :func:`automatic_job`, :func:`finetune_job`) run by the
:class:`~.jobs.JobManager`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..errors import CancelledError, InputError
from ..geometry import ORIENTATIONS
from ..prompts import Prompts
from .jobs import Job
from .state import ServiceState, check_adapter_name

__all__ = ["PROMPT_FIELDS", "FINETUNE_FIELDS", "check_fields", "parse_prompt", "check_prompt", "segment_2d",
           "prompt_job", "automatic_job", "finetune_job", "resolve_axis"]


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise InputError(f"{what} must be a name of 1-64 characters")
    return value


def _bool(value: Any, what: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise InputError(f"{what} must be true, false or null")
    return value


def _int(value: Any, what: str, low: int = 0, high: int = 1 << 31) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{what} must be an integer in {low}..{high}")
    return value


def _numbers(value: Any, count: int, what: str) -> list[float]:
    if not isinstance(value, list) or len(value) != count or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise InputError(f"{what} must be a list of {count} finite numbers")
    return [float(v) for v in value]


def _choice(value: Any, what: str, choices: tuple) -> Any:
    if value not in choices:
        raise InputError(f"{what} must be one of {', '.join(map(str, choices))}")
    return value


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list) or len(value) > 1000:
        raise InputError(f"{what} must be a list (at most 1000 items)")
    return value


def _intensity(value: Any) -> dict | None:
    if value is None:
        return None
    from ..preprocessing import INTENSITY_MODES, IntensitySettings

    if not isinstance(value, dict) or set(value) - {"mode", "window"}:
        raise InputError("intensity must be {\"mode\": ..., \"window\": [level, width]}")
    result = {"mode": _choice(value.get("mode", IntensitySettings().mode), "intensity mode", INTENSITY_MODES)}
    if "window" in value:
        result["window"] = _numbers(value["window"], 2, "intensity window")
    return result


def check_fields(body: Any, allowed: dict[str, Callable[[Any], Any]], what: str) -> dict:
    """``body`` with each allowed field parsed by its function; unknown fields are refused."""
    if not isinstance(body, dict):
        raise InputError(f"{what} must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InputError(f"{what}: unknown field {unknown[0][:40]!r} (allowed: {', '.join(sorted(allowed))})")
    return {key: allowed[key](body[key]) for key in body}


def resolve_axis(value: Any) -> str | int:
    """A slicing axis: ``auto``/``axial``/``coronal``/``sagittal`` or a voxel axis 0 (I), 1 (J), 2 (K)."""
    from ..inference import AXES

    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1, 2):
        return value
    if value in AXES:
        return value
    raise InputError(f"axis must be one of {', '.join(AXES)} or a voxel axis 0 (I), 1 (J), 2 (K)")


def _strategy(value: Any) -> str | None:
    from ..inference import BOX3D_STRATEGIES

    return None if value is None else _choice(value, "box3d_strategy", BOX3D_STRATEGIES)


def _keep(value: Any) -> str | None:
    from ..inference.automatic import KEEP_COMPONENTS

    return None if value is None else _choice(value, "keep_components", KEEP_COMPONENTS)


def _encoder(value: Any) -> str:
    from ..finetune.trainer import ENCODER_MODES

    return _choice(value, "encoder", ENCODER_MODES)


def _scope(value: Any) -> str:
    from ..finetune.trainer import EMBEDDING_ADAPTER_SCOPES

    return _choice(value, "embedding_adapter_scope", EMBEDDING_ADAPTER_SCOPES)


def _automatic_net(value: Any) -> str:
    from ..finetune.automatic_choice import AUTOMATIC_NET_MODES

    return _choice(value, "automatic_net", AUTOMATIC_NET_MODES)


PROMPT_FIELDS: dict[str, Callable[[Any], Any]] = {
    "box": lambda v: None if v is None else _numbers(v, 6, "box"),
    "points": lambda v: [_numbers(p, 3, "a point") for p in (v if isinstance(v, list) else [None])],
    "negatives": lambda v: [_numbers(p, 3, "a negative point") for p in (v if isinstance(v, list) else [None])],
    "axis": resolve_axis,
    "model": lambda v: None if v is None else _name(v, "model"),
    "adapter": lambda v: None if v is None else check_adapter_name(v),
    "box3d_strategy": _strategy,
    "propagate": lambda v: _bool(v, "propagate"),
    "intensity": _intensity,
}


def parse_prompt(body: Any) -> tuple[Prompts, dict]:
    """``(Prompts, options)`` from a prompt request."""
    fields = check_fields(body, PROMPT_FIELDS, "prompt request")
    prompts = Prompts.from_dict({k: fields.get(k) or [] for k in ("points", "negatives")} | {"box": fields.get("box")})
    if fields.get("model") and fields.get("adapter"):
        raise InputError("give a model or an adapter, not both")
    return prompts, fields


def _axis(state: ServiceState, volume_id: str, options: dict) -> str | int:
    """The axis setting of a prompt: the request's, or an adapter's own orientation for ``auto``
    (an adapter knows slices of one orientation only), as :func:`MedFMSegmentLib.api.segment_image`."""
    from ..finetune.adapters import AdapterInfo
    from ..inference.settings import DEFAULT_AXIS

    axis = options.get("axis", DEFAULT_AXIS)
    if options.get("adapter") and axis == "auto":
        axis = AdapterInfo.from_metadata(state.adapter_metadata(options["adapter"])).axis
    return axis


def check_prompt(state: ServiceState, volume_id: str, prompts: Prompts, options: dict) -> tuple[int, int] | None:
    """Check a prompt against its volume (no model needed); ``(voxel_axis, index)`` when it segments
    one slice only (answered at once), None when it is a 3D job."""
    from ..geometry import box_on_axis, to_slice_coords
    from ..inference import choose_axis

    geometry = state.volume(volume_id).geometry
    prompts.validate(geometry)
    if prompts.is_empty:
        raise InputError("at least one prompt is needed: a box or a positive point")
    axis = _axis(state, volume_id, options)
    if options.get("propagate"):
        return None
    if geometry.size[2] == 1:
        voxel_axis = 2
    elif axis == "auto":
        voxel_axis = choose_axis(prompts, geometry)
    else:
        try:
            voxel_axis = axis if isinstance(axis, int) else geometry.voxel_axis_for(axis)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    if prompts.box is not None:
        _, first, last = box_on_axis(prompts.box, voxel_axis)
        return (voxel_axis, first) if first == last else None
    slices = {int(round(to_slice_coords(p, voxel_axis)[2])) for p in prompts.positives}
    return (voxel_axis, slices.pop()) if len(slices) == 1 else None


def _prepare(state: ServiceState, volume_id: str, options: dict):
    """The session for a prompt, its axis and settings set as an in-process call would set them."""
    from ..inference import PredictorSettings

    session, _ = state.session(volume_id, options.get("model"), options.get("adapter"), options.get("intensity"))
    session.set_axis(_axis(state, volume_id, options))
    settings = PredictorSettings(box3d_strategy=options.get("box3d_strategy") or PredictorSettings().box3d_strategy)
    if session.settings != settings:  # a job paused between slices keeps the settings it runs with
        session.settings = settings
    return session


def segment_2d(state: ServiceState, volume_id: str, prompts: Prompts, options: dict,
               where: tuple[int, int]) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Segment a one-slice prompt (``where`` from :func:`check_prompt`) now:
    ``(array_axis, index, plane, full mask)``."""
    from ..geometry import array_axis, slice_from_volume

    with state.turns.interactive():  # between a running job's slices, not after the job
        session = _prepare(state, volume_id, options)
        mask = session.segment(prompts, propagate=options.get("propagate"))
    voxel_axis, index = where
    if session.axis_for(prompts) != voxel_axis:
        raise RuntimeError(f"the prompt was planned on voxel axis {voxel_axis}, "
                           f"segmented on {session.axis_for(prompts)}")
    return array_axis(voxel_axis), index, slice_from_volume(mask, voxel_axis, index), mask


def prompt_job(state: ServiceState, volume_id: str, prompts: Prompts, options: dict) -> Callable[[Job], Any]:
    """The work of a 3D prompt: the mask, slices reported as they are written."""
    from ..geometry import array_axis

    def work(job: Job) -> np.ndarray:
        session = _prepare(state, volume_id, options)
        # on_update names the library's voxel axis (0 = I); clients get the numpy axis (0 = K).
        return _tracked(job, session, 0, lambda: session.segment(
            prompts, propagate=options.get("propagate"), progress=job.progress,
            cancel=state.turns.checkpoint(job.cancel),
            on_update=lambda voxel_axis, index, plane: job.add_update(array_axis(voxel_axis), index, plane)))

    return work


def _tracked(job: Job, session, planned: int, run: Callable[[], np.ndarray]) -> np.ndarray:
    """``run()``'s mask, the job tracking its slices (updates end equal to the mask)."""
    job.start_mask(session.image.geometry.shape)
    job.progress(0, planned, "segmenting")
    mask = run()
    job.finish_mask(mask)
    return mask


AUTOMATIC_FIELDS: dict[str, Callable[[Any], Any]] = {
    "adapter": check_adapter_name,
    "keep_components": _keep,
    "intensity": _intensity,
}


def automatic_job(state: ServiceState, volume_id: str, body: Any) -> Callable[[Job], Any]:
    """The work of prompt-free segmentation of a volume with an adapter trained for it."""
    options = check_fields(body, AUTOMATIC_FIELDS, "automatic request")
    if "adapter" not in options:
        raise InputError("automatic segmentation needs an adapter")
    state.volume(volume_id)
    state.existing_adapter(options["adapter"])

    def work(job: Job) -> np.ndarray:
        from ..inference import segment_automatic

        session, info = state.session(volume_id, adapter=options["adapter"], intensity=options.get("intensity"))
        if not info.automatic:
            raise InputError(f"adapter {options['adapter']!r} was not trained for automatic segmentation")
        session.set_axis(info.axis)
        return _tracked(job, session, session.num_slices, lambda: segment_automatic(
            session, keep=options.get("keep_components") or info.keep_components, progress=job.progress,
            cancel=state.turns.checkpoint(job.cancel)))

    return work


FINETUNE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "name": check_adapter_name,
    "model": lambda v: _name(v, "model"),
    "overwrite": lambda v: bool(_bool(v, "overwrite")),
    "steps": lambda v: _int(v, "steps", 1, 100000),
    "encoder": _encoder,
    "label_value": lambda v: None if v is None else _int(v, "label_value", 1, 65535),
    "label_name": lambda v: _name(v, "label_name"),
    "seed": lambda v: _int(v, "seed"),
    "rank": lambda v: _int(v, "rank", 1, 64),
    "validate_every": lambda v: _int(v, "validate_every", 1, 100000),
    "max_validation_slices": lambda v: _int(v, "max_validation_slices", 1, 1000),
    "embedding_budget": lambda v: _int(v, "embedding_budget", 1, 100000),
    "embedding_adapter_channels": lambda v: _int(v, "embedding_adapter_channels", 0, 1024),
    "embedding_adapter_scope": _scope,
    "automatic_net": _automatic_net,
    "axis": lambda v: _choice(v, "axis", ORIENTATIONS),
    "from": check_adapter_name,  # continue this adapter (finetune --from), its settings kept
}
#: What a continued adapter takes from its parent; a request cannot set them.
PARENT_FIELDS = ("model", "encoder", "rank", "label_value", "label_name", "axis", "embedding_adapter_channels")


def finetune_job(state: ServiceState, body: Any) -> Callable[[Job], Any]:
    """The work of fine-tuning on uploaded image/label volumes; the adapter is written into the
    adapter folder under ``config["name"]`` only when training finished (never when cancelled)."""
    request = check_fields(body, {"images": lambda v: _list(v, "images"), "labels": lambda v: _list(v, "labels"),
                                  "config": lambda v: v}, "fine-tuning request")
    images, labels = request.get("images", []), request.get("labels", [])
    if not images or len(images) != len(labels):
        raise InputError(f"fine-tuning needs images and labels in pairs ({len(images)} images, {len(labels)} labels)")
    config = check_fields(request.get("config", {}), FINETUNE_FIELDS, "fine-tuning config")
    if "name" not in config:
        raise InputError("fine-tuning config needs the new adapter's name")
    target = state.adapter_path(config.pop("name"))
    overwrite = config.pop("overwrite", False)
    if target.exists() and not overwrite:
        raise InputError(f"adapter {target.name!r} exists (set overwrite to replace it)")
    parent = config.pop("from", None)
    if parent is not None:
        fixed = sorted(set(config) & set(PARENT_FIELDS))
        if fixed:
            raise InputError(f"a continued adapter keeps its parent's {', '.join(fixed)}")
        config["model"] = (state.adapter_metadata(parent).get("base_model") or {}).get("name")
    model = config.pop("model", state.default_model)
    if model not in state.model_specs:
        raise InputError(f"model {model!r} is not served here")
    for volume in images + labels:
        if not isinstance(volume, str):
            raise InputError("images and labels are volume ids")
        state.volume(volume)
    rank = config.pop("rank", 4)

    def work(job: Job) -> dict:
        from ..finetune.adapters import save_adapter
        from ..finetune.comparison import summary_line
        from ..finetune.continual import continue_adapter
        from ..finetune.trainer import FinetuneConfig, finetune

        cases = [(state.volume(i), state.volume(l)) for i, l in zip(images, labels)]
        settings = FinetuneConfig(model_name=model, checkpoint=state.model_specs[model], device=str(state.device),
                                  lora_rank=rank, lora_alpha=2.0 * rank, **config)

        def report(item: dict) -> None:
            job.add_report(item)
            if item.get("stage") in ("embedding", "automatic_net"):
                job.progress(item["done"], item["total"], item["stage"])
                return
            job.progress(item["step"], item["steps"], "training")
            with job._lock:
                job.metrics["step"], job.metrics["loss"] = item["step"], item["loss"]
                if item.get("val_dice") is not None:
                    job.metrics["val_dice"] = item["val_dice"]
                if item.get("base_val_dice") is not None:
                    job.metrics["base_val_dice"] = item["base_val_dice"]

        checkpoint = state.turns.checkpoint(job.cancel)
        if parent is None:
            trained, metadata = finetune(cases, settings, progress=report, cancel=checkpoint)
        else:  # parent's files are never replayed here: a client sends every case it wants trained
            trained, metadata = continue_adapter(state.existing_adapter(parent), cases, replay=False,
                                                 progress=report, cancel=checkpoint, device=str(state.device),
                                                 checkpoint=state.model_specs[model], **config)
        if job.cancel.is_set():
            raise CancelledError("fine-tuning cancelled")
        job.progress(job.done, job.planned, "saving")
        save_adapter(trained, target, metadata)
        figures = {k: metadata.get(k) for k in ("base_validation_dice", "adapted_validation_dice")}
        with job._lock:
            job.metrics.update(figures)
        job.message = f"adapter {target.name} written ({summary_line(metadata)})"
        return {"adapter": target.name, "from": parent, **figures, "metadata": metadata}

    return work
