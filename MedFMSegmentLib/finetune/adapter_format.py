"""The adapter folder format: ``adapter.safetensors`` + ``metadata.json``, read, checked and written.

An adapter is a folder holding exactly two files: the trained weights (safetensors, never a
pickle) and their metadata (JSON: base model identity, training settings, lineage). This module
knows the files only; how the weights are put into a model (LoRA, embedding adapter) lives in
:mod:`.adapters`.

Writing is crash-safe: the new adapter is written into a uniquely named hidden sibling folder
and swapped in (``renameat2(RENAME_EXCHANGE)`` where the system has it, else old -> backup,
new -> final, backup removed), so at the final name there is always the old adapter or the new
one, complete; leftovers of an interrupted save (the tool's own hidden names only) are
recovered or swept by the next save.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..inference.automatic import KEEP_COMPONENTS
from .automatic_choice import check_net_settings
from .box_prompts import BOX_PROMPTS
from ..files import new_sibling, process_alive, temporary_name
from ..preprocessing import INTENSITY_MODES, IntensitySettings

__all__ = ["WEIGHTS_FILE", "METADATA_FILE", "FORMAT_VERSION", "LIMITS", "METADATA_DEFAULTS", "read_metadata",
           "validate_metadata", "read_weights", "weights_sha256", "write_adapter", "sweep_leftovers",
           "check_output_folder", "model_identity"]

WEIGHTS_FILE = "adapter.safetensors"
METADATA_FILE = "metadata.json"
#: The newest format: 2 adds automatic mode's U-Net (``automatic_net``); 1 is everything else, and
#: fine-tuning still writes 1 when there is no U-Net, so older readers keep reading those.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
ADAPTER_FILES = frozenset({WEIGHTS_FILE, METADATA_FILE})
#: Bounds on the sizes metadata may ask for: what fine-tuning can produce, with room to spare.
LIMITS = {"embedding_adapter_channels": 1024, "lora_rank": 256, "encoder_stage": 64, "lora_targets": 16,
          "metadata_bytes": 4 * 1024 * 1024}
#: What metadata that omits a segmentation setting means (fine-tuning's defaults; it writes them all).
METADATA_DEFAULTS = {"axis": "axial", "keep_components": KEEP_COMPONENTS[0], "label_name": "label"}
_NEW, _OLD = ".adapter-new", ".adapter-old"


def _leftover_writer(path: Path, name: str) -> int | None | bool:
    """Whether ``path`` is a hidden sibling this module (or an earlier version of it) creates
    beside adapter ``name``, and whose: the writer's process id for
    :func:`~MedFMSegmentLib.files.new_sibling`'s ``.NAME.PID-HEX12`` names (plus ``.adapter-new``
    or ``.adapter-old``), None for older versions' names without one (``.NAME.HEX12``,
    ``.NAME.old``), False for anything else."""
    parts = temporary_name(path.name)
    if parts is not None and parts[0] == name and parts[2] in ("", _NEW, _OLD):
        return parts[1]
    legacy = re.fullmatch(rf"\.{re.escape(name)}(\.[0-9a-f]{{12}}(\{_NEW}|\{_OLD})?|\.old)", path.name)
    return None if legacy else False


def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{what} must be a whole number from {low} to {high}, got {value!r}")
    return value


def _numbers(value: Any, count: int) -> bool:
    return (isinstance(value, list) and len(value) == count and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _check_settings(metadata: dict, where: str) -> None:
    """The segmentation settings an adapter carries: intensity, label, axis, components."""
    intensity, defaults = metadata.get("intensity", {}), IntensitySettings()
    if (not isinstance(intensity, dict) or intensity.get("mode", defaults.mode) not in INTENSITY_MODES
            or not _numbers(intensity.get("window", list(defaults.window)), 2)
            or not _numbers(intensity.get("percentiles", list(defaults.percentiles)), 2)):
        raise InputError(f"{where}: metadata intensity settings are malformed")
    label_value = metadata.get("label_value")
    if label_value is not None:
        _int(label_value, f"{where}: label_value", -2**31, 2**31 - 1)
    if metadata.get("keep_components", METADATA_DEFAULTS["keep_components"]) not in KEEP_COMPONENTS:
        raise InputError(f"{where}: keep_components must be {' or '.join(KEEP_COMPONENTS)}")
    if metadata.get("box_prompts", BOX_PROMPTS[0]) not in BOX_PROMPTS:
        raise InputError(f"{where}: box_prompts must be {' or '.join(BOX_PROMPTS)}")
    if (not isinstance(metadata.get("axis", METADATA_DEFAULTS["axis"]), str)
            or not isinstance(metadata.get("label_name", METADATA_DEFAULTS["label_name"]), str)):
        raise InputError(f"{where}: metadata axis and label_name must be text")


def validate_metadata(metadata: Any, where: str = "adapter") -> dict:
    """Check the fields that decide what is built from an adapter; raise one-line :class:`InputError`."""
    if not isinstance(metadata, dict):
        raise InputError(f"{where}: metadata.json must hold a JSON object")
    if metadata.get("format", 1) not in READABLE_FORMATS:
        raise InputError(f"{where}: unknown adapter format {metadata.get('format')!r} (this version reads "
                         f"{' and '.join(map(str, READABLE_FORMATS))})")
    if metadata.get("automatic_net") and metadata.get("format") != 2:
        raise InputError(f"{where}: an adapter with automatic_net must be format 2")
    base = metadata.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("name"), str):
        raise InputError(f"{where}: metadata.json lacks base_model.name")
    lora = metadata.get("lora")
    if lora is not None:
        if not isinstance(lora, dict):
            raise InputError(f"{where}: metadata lora must be an object or null")
        _int(lora.get("rank", 4), f"{where}: LoRA rank", 1, LIMITS["lora_rank"])
        alpha = lora.get("alpha", 8)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise InputError(f"{where}: LoRA alpha must be a positive number, got {alpha!r}")
        targets = lora.get("targets", ["qkv", "proj"])
        if (not isinstance(targets, list) or not 1 <= len(targets) <= LIMITS["lora_targets"]
                or not all(isinstance(t, str) and t.isidentifier() for t in targets)):
            raise InputError(f"{where}: LoRA targets must be a list of layer names")
        stages = lora.get("encoder_stages")
        if stages is not None:
            if not isinstance(stages, list) or not stages:
                raise InputError(f"{where}: LoRA encoder_stages must be a non-empty list or null")
            for stage in stages:
                _int(stage, f"{where}: LoRA encoder stage", 0, LIMITS["encoder_stage"])
    _check_settings(metadata, where)
    if lora is not None and metadata.get("box_prompts") == "base":
        raise InputError(f"{where}: box_prompts 'base' is for frozen-encoder adapters; this one has LoRA layers")
    check_net_settings(metadata.get("automatic_net"), where)
    adapter = metadata.get("embedding_adapter")
    if adapter:
        if not isinstance(adapter, dict):
            raise InputError(f"{where}: metadata embedding_adapter must be an object or null")
        _int(adapter.get("channels"), f"{where}: embedding adapter channels", 1,
             LIMITS["embedding_adapter_channels"])
    return metadata


def read_metadata(adapter_dir: str | os.PathLike) -> dict:
    """The checked ``metadata.json`` of an adapter folder (both files must be there)."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / METADATA_FILE
    if not path.is_file() or not (adapter_dir / WEIGHTS_FILE).is_file():
        raise InputError(f"{adapter_dir} is not an adapter folder (needs {WEIGHTS_FILE} and {METADATA_FILE})")
    if path.stat().st_size > LIMITS["metadata_bytes"]:
        raise InputError(f"{path} is too large for adapter metadata")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {str(exc).splitlines()[0]}") from None
    return validate_metadata(metadata, str(adapter_dir))


def weights_sha256(adapter_dir: str | os.PathLike) -> str:
    """SHA-256 of the adapter's weights file: its identity in a child adapter's lineage."""
    digest = hashlib.sha256()
    with open(Path(adapter_dir) / WEIGHTS_FILE, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(adapter_dir: str | os.PathLike, metadata: dict) -> dict[str, torch.Tensor]:
    """The adapter's tensors; damaged or tampered weights raise :class:`InputError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    adapter_dir = Path(adapter_dir)
    expected = metadata.get("weights_sha256")
    if expected is not None and weights_sha256(adapter_dir) != expected:
        raise InputError(f"adapter {adapter_dir}: {WEIGHTS_FILE} does not match the SHA-256 in {METADATA_FILE} "
                         "(damaged or replaced)")
    try:
        state = load((adapter_dir / WEIGHTS_FILE).read_bytes())
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"adapter {adapter_dir}: {WEIGHTS_FILE} is not a readable safetensors file "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise InputError(f"adapter {adapter_dir}: weight {key} holds NaN or infinite values")
    return state


def model_identity(model: torch.nn.Module) -> str:
    """The base model's SHA-256: of its weights file when loaded from one, else of its tensors."""
    sha = getattr(model, "weights_sha256", "")
    if sha:
        return sha
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_output_folder(folder: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse, before any training, an output that is not ours to replace.

    A regular file, a folder holding anything besides an adapter's two files, or an existing
    adapter without ``overwrite`` raise :class:`InputError`; an empty folder is fine.
    """
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise InputError(f"{folder} exists and is not an adapter folder; refusing to replace it")
    if not folder.parent.is_dir():
        raise InputError(f"output folder's parent does not exist or is not a folder: {folder.parent}")
    if not os.access(folder.parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write in {folder.parent} (permission denied)")
    if folder.is_dir():
        names = sorted(p.name for p in folder.iterdir())
        foreign = [n for n in names if n not in ADAPTER_FILES]
        if foreign:
            raise InputError(f"{folder} holds files that are not an adapter's ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); choose another output folder")
        if names and not overwrite:
            raise InputError(f"{folder} exists (use --overwrite to replace it)")
    return folder


def _is_complete(folder: Path) -> bool:
    try:
        metadata = read_metadata(folder)
        expected = metadata.get("weights_sha256")
        return expected is None or weights_sha256(folder) == expected
    except (InputError, OSError):
        return False


def sweep_leftovers(folder: str | os.PathLike) -> None:
    """Recover or remove what an interrupted save left beside ``folder``.

    Only hidden siblings with this module's own names are touched. When ``folder`` is missing, a
    complete backup of the previous adapter (or, failing that, a complete new one) takes its place.
    """
    folder = Path(folder)
    if not folder.parent.is_dir():
        return

    def abandoned(path: Path) -> bool:  # a live writer's folders are its own business
        writer = _leftover_writer(path, folder.name)
        return writer is not False and path.is_dir() and not path.is_symlink() and not (
            writer is not None and process_alive(writer))

    leftovers = sorted((p for p in folder.parent.iterdir() if abandoned(p)),
                       key=lambda p: (not p.name.endswith((_OLD, ".old")), p.name))
    if not os.path.lexists(folder):
        for candidate in leftovers:
            if _is_complete(candidate):
                os.replace(candidate, folder)
                leftovers.remove(candidate)
                break
    for path in leftovers:
        if all(child.name in ADAPTER_FILES or child.name.endswith(".partial") for child in path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system or kernel cannot
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_adapter(folder: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict,
                  exchange: bool = True) -> Path:
    """Write weights + metadata (with the weights' SHA-256 added) as the adapter folder ``folder``.

    ``exchange=False`` skips the atomic swap and uses the backup-rename fallback (tested on its own).
    """
    from safetensors.torch import save

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(folder)
    check_output_folder(folder, overwrite=True)
    tmp = new_sibling(folder, suffix=_NEW, directory=True)
    try:
        # Bytes written by us, not save_file: safetensors creates its files 0600 (owner only), and
        # an adapter is meant to be shared.
        payload = save(state)
        metadata = {**metadata, "weights_sha256": hashlib.sha256(payload).hexdigest()}
        for name, data in ((WEIGHTS_FILE, payload), (METADATA_FILE, json.dumps(metadata, indent=2).encode())):
            with open(tmp / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if not os.path.lexists(folder):
            os.replace(tmp, folder)
        elif exchange and _exchange(tmp, folder):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous adapter
        else:
            backup = new_sibling(folder, suffix=_OLD, directory=True)
            os.replace(folder, backup)  # onto the empty folder just made: the name stays ours
            os.replace(tmp, folder)
            shutil.rmtree(backup, ignore_errors=True)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
