"""``medfmsegment finetune ... --server URL``: train an adapter on a service, write it here.

The images and labels are read and checked here, uploaded, and trained on by the service's
fine-tuning job; every progress report the job makes (embedding counts, then step, loss and
validation Dice) reaches ``progress`` as the local trainer's would, so the command prints the
same lines. Ctrl-C cancels the job on the service (which then writes no adapter). The trained
adapter stays in the service's adapter folder (under a free name, see :func:`remote_name`) and is
written into the local output folder as a local run writes it: refused if it exists without
``overwrite``, crash-safe, its metadata naming the local training files.

Continuing an adapter (``--from``): the local adapter folder travels as an upload (unless the
service holds the same adapter already), and the parent's own training cases that are still
readable here travel first with the new ones, so the service trains on what a local run would.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError
from .client import ServiceClient
from .remote import connect, follow_job, service_errors

__all__ = ["finetune_remote", "remote_name", "parent_on_service", "write_downloaded_adapter"]

#: Settings a remote fine-tuning may ask for (the service's fine-tuning config fields).
SETTINGS = ("steps", "encoder", "rank", "label_value", "label_name", "seed", "embedding_budget",
            "embedding_adapter_channels", "embedding_adapter_scope", "model", "validate_every",
            "max_validation_slices", "automatic_net")
#: Of those, what a continued adapter may set (the parent's settings fix the rest).
CONTINUE_SETTINGS = ("steps", "seed", "embedding_budget", "validate_every", "max_validation_slices", "automatic_net")


def remote_name(client: ServiceClient, wanted: str) -> str:
    """A name for the new adapter in the service's folder: ``wanted`` made a valid name, with
    ``-2``, ``-3``... added while the service has an adapter of that name."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", wanted).strip(".-")[:56] or "adapter"
    if not base[0].isalnum():
        base = "a" + base
    taken = {adapter["name"] for adapter in client.adapters()}
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def parent_on_service(client: ServiceClient, parent) -> str:
    """The service's name for the adapter to continue (a :class:`~MedFMSegmentLib.finetune.lineage.ParentAdapter`):
    an adapter it holds with the same weights and metadata (where its training files came from
    aside: the service never replays them), else the local folder uploaded under a free name."""
    def same(metadata: dict) -> bool:
        return metadata.get("weights_sha256") == parent.weights_sha256 and \
            {k: v for k, v in metadata.items() if k not in ("training_cases", "lineage")} == \
            {k: v for k, v in parent.metadata.items() if k not in ("training_cases", "lineage")}

    for adapter in client.adapters():
        if same(adapter.get("metadata") or {}):
            return adapter["name"]
    name = remote_name(client, Path(parent.path).name)
    client.upload_adapter(parent.path, name)
    return name


def _continued_config(parent, settings: dict):
    """The local :class:`FinetuneConfig` of continuing ``parent`` with ``settings``, checked."""
    from ..finetune.continual import config_from_parent

    base = parent.metadata["base_model"]["name"]
    if settings.get("model") not in (None, base):
        raise InputError(f"the adapter to continue was trained on base model {base}, not {settings['model']}")
    fixed = sorted(set(settings) - set(CONTINUE_SETTINGS) - {"model"})
    if fixed:
        raise InputError(f"a continued adapter keeps its parent's {', '.join(fixed)}")
    return config_from_parent(parent, **{k: v for k, v in settings.items() if k != "model"})


def _check_locally(images: list, labels: list, output: Path, overwrite: bool, settings: dict,
                   parent=None, replay: bool = True) -> tuple[list, int]:
    """What the local command checks before training; ``(cases, replayed)``: the cases
    ``[(image, label), ...]`` to send, ``replayed`` of them the parent's own, first."""
    from ..finetune.adapter_format import check_output_folder, sweep_leftovers
    from ..finetune.trainer import FinetuneConfig, check_cases, check_config
    from ..io import read_image, read_label

    if not images:
        raise InputError("finetune needs at least one --image IMG --label LBL pair")
    if len(images) != len(labels):
        raise InputError(f"every --image needs its --label ({len(images)} images, {len(labels)} labels)")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise InputError(f"unknown fine-tuning settings for a service: {', '.join(unknown)}")
    check_output_folder(output, overwrite)
    try:
        sweep_leftovers(output)
    except OSError as exc:
        raise InputError(f"cannot tidy the hidden leftovers beside {output}: {exc.strerror or exc}") from None
    check_output_folder(output, overwrite)
    if parent is None:
        local = {("lora_rank" if k == "rank" else "model_name" if k == "model" else k): v for k, v in settings.items()}
        config = FinetuneConfig(**local)
    else:
        config = _continued_config(parent, settings)
    check_config(config)
    cases = [(read_image(image), read_label(label)) for image, label in zip(images, labels)]
    check_cases(cases, config.label_value)
    if parent is None or not replay:
        return cases, 0
    from ..finetune.continual import replay_cases

    old = replay_cases(parent)
    return old + cases, len(old)


def finetune_remote(images: list[str | os.PathLike], labels: list[str | os.PathLike], output: str | os.PathLike,
                    *, server: str, token_file: str | os.PathLike | None = None, overwrite: bool = False,
                    settings: dict[str, Any] | None = None, parent: str | os.PathLike | None = None,
                    replay: bool = True, progress: Callable[[dict], None] | None = None,
                    on_started: Callable[[str, str], None] | None = None, poll: float = 0.3) -> tuple[Path, dict]:
    """Fine-tune on the service at ``server``; ``(output, metadata)`` of the adapter written here.

    Args:
        images, labels: Training image and label files, in pairs.
        output: The local adapter folder (refused when it exists, unless ``overwrite``).
        settings: Fine-tuning settings (:data:`SETTINGS`: ``steps``, ``encoder``, ``rank``,
            ``label_value``, ``label_name``, ...); None values are left to the service's
            defaults, which follow its device as a local run's follow this one's. With ``parent``:
            :data:`CONTINUE_SETTINGS` only (and ``model`` when it is the parent's).
        parent: A local adapter folder to continue (as ``finetune --from``); with ``replay`` its
            own training cases still readable here train again first.
        progress: Called with each report of the job (as :func:`MedFMSegmentLib.finetune.trainer.finetune`
            calls its ``progress``).
        on_started: Called with ``(job id, adapter name on the service)`` once the job is queued.
    """
    output = Path(output)
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    adapter = None
    if parent is not None:
        from ..finetune.continual import load_parent

        adapter = load_parent(parent)
    cases, replayed = _check_locally(list(images), list(labels), output, overwrite, settings, adapter, replay)
    if adapter is not None:
        adapter.replayed_cases = replayed
    client, info = connect(server, token_file)
    model = settings.get("model") if adapter is None else adapter.metadata["base_model"]["name"]
    if model is not None and model not in info.get("models", []):
        raise InputError(f"the service does not serve model {model} (it serves {', '.join(info.get('models', []))})")
    with service_errors(server):
        config = dict(settings)
        if adapter is not None:
            config = {k: v for k, v in config.items() if k != "model"}
            config["from"] = parent_on_service(client, adapter)
        name = remote_name(client, output.name)
        job = client.finetune([image for image, _ in cases], [label for _, label in cases], {**config, "name": name})
        if on_started is not None:
            on_started(job, name)
        cursor = 0

        def relay(status) -> None:
            nonlocal cursor
            cursor, reports = client.reports(job, cursor)
            for report in reports:
                if progress is not None:
                    progress(report)

        follow_job(client, job, on_status=relay, poll=poll)
        archive = client.request("GET", f"/adapters/{name}/archive")[2]
    metadata = write_downloaded_adapter(archive, output, cases, adapter)
    return output, metadata


def write_downloaded_adapter(archive: bytes, output: Path, cases: list, parent=None) -> dict:
    """Write the adapter in ``archive`` (from the service) as the local folder ``output``, as a local
    run writes it (:func:`MedFMSegmentLib.finetune.adapter_format.write_adapter`), its metadata
    naming the local training files of ``cases``; the metadata written. ``parent``: the local
    :class:`~MedFMSegmentLib.finetune.lineage.ParentAdapter` a continued adapter's lineage names
    (its ``replayed_cases``: how many of ``cases``, the first, were its own)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from ..finetune.adapter_format import METADATA_FILE, WEIGHTS_FILE, validate_metadata, write_adapter
    from ..finetune.lineage import case_files, lineage
    from .archive import ArchiveError, read_adapter_archive

    try:
        contents, metadata = read_adapter_archive(archive)
    except ArchiveError as exc:
        raise InputError(f"the service sent a damaged adapter: {exc}") from None
    payload = contents[WEIGHTS_FILE]
    if metadata.get("weights_sha256") != hashlib.sha256(payload).hexdigest():
        raise InputError(f"the service sent an adapter whose {WEIGHTS_FILE} does not match its {METADATA_FILE}")
    validate_metadata(metadata, "the service's adapter")
    try:
        state = load(payload)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise InputError(f"the service sent an unreadable {WEIGHTS_FILE}: {exc}") from None
    names = [label.source or image.source for image, label in cases]
    metadata = {k: v for k, v in metadata.items() if k != "weights_sha256"}  # written anew with the weights
    metadata["training_cases"] = {"count": len(cases), "names": names, "files": case_files(cases)}
    if parent is not None and metadata.get("lineage"):  # the service saw its upload and volume ids
        metadata["lineage"] = lineage(parent, names, metadata["lineage"][-1].get("date"))
    write_adapter(output, state, metadata)
    return metadata
