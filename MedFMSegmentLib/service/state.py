"""What the service keeps between requests: models, adapters, volumes, sessions, one embedding cache.

Volumes are held in memory under their content-derived id (see :func:`.wire.volume_id`) up to a
memory budget, the least recently used dropped first. A :class:`SegmentationSession` is kept per
(volume, model or adapter, intensity setting); all sessions share one bounded
:class:`EmbeddingCache`, so one budget bounds the embeddings of every volume. Adapters are named,
never given as paths: a name is looked up in the server's adapter folder.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io import MedicalImage
from .turns import ModelTurns

__all__ = ["Limits", "ServiceState", "FocusWorker", "check_adapter_name"]

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_adapter_name(name: object) -> str:
    """``name`` if it is a valid adapter name (letters, digits, ``._-``, no path), else InputError."""
    if not isinstance(name, str) or not ADAPTER_NAME.match(name) or ".." in name:
        raise InputError(f"adapter name must be 1-64 letters, digits, '.', '_' or '-' (no path), got "
                         f"{str(name)[:80]!r}")
    return name


@dataclass
class Limits:
    """Request and memory limits (bytes)."""

    max_upload_bytes: int = 2 << 30
    max_volume_bytes: int = 4 << 30
    max_json_bytes: int = 1 << 20
    volume_memory_bytes: int = 16 << 30
    max_volumes: int = 64

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Volume:
    image: MedicalImage
    nbytes: int


class ServiceState:
    """Models, adapters, volumes and sessions of a running service (thread-safe).

    Args:
        models: Model names served, each with its checkpoint path (None for the embedded LiteMedSAM).
        adapter_dir: The folder holding the adapters clients may name (fine-tuning writes there).
        device, backend, precision: As :func:`MedFMSegmentLib.models.load_model`.
        limits: Request and memory limits.
    """

    def __init__(self, models: dict[str, str | None], adapter_dir: Path, device: str = "auto",
                 backend: str | None = None, precision: str | None = None, limits: Limits | None = None) -> None:
        from ..models import resolve_device
        from ..inference import EmbeddingCache, PredictorSettings

        self.model_specs = dict(models)
        self.default_model = next(iter(self.model_specs))
        self.adapter_dir = Path(adapter_dir)
        self.device = resolve_device(device)
        self.backend, self.precision = backend, precision
        self.limits = limits or Limits()
        self.cache = EmbeddingCache(PredictorSettings().cache_bytes_for(self.device))
        #: Every model call takes a turn: jobs for their run (offering it between slices), 2D
        #: prompts and focus embeddings for theirs (see :mod:`.turns`).
        self.turns = ModelTurns()
        self._lock = threading.RLock()
        self._models: dict[str, object] = {}
        self._adapters: dict[str, tuple[float, object, object]] = {}
        self._volumes: OrderedDict[str, _Volume] = OrderedDict()
        self._sessions: dict[tuple, object] = {}
        self._load_lock = threading.Lock()

    # ------------------------------------------------------------------ models and adapters
    def model(self, name: str | None = None):
        """The loaded model ``name`` (default: the first one served), loaded on first use."""
        from ..loading import load_model

        name = name or self.default_model
        if name not in self.model_specs:
            raise InputError(f"model {str(name)[:60]!r} is not served here; served: {', '.join(self.model_specs)}")
        with self._load_lock:
            if name not in self._models:
                self._models[name] = load_model(name, self.model_specs[name], str(self.device),
                                                backend=self.backend, precision=self.precision)
            return self._models[name]

    def adapter_path(self, name: str) -> Path:
        return self.adapter_dir / check_adapter_name(name)

    def existing_adapter(self, name: str) -> Path:
        """The folder of the adapter ``name``; InputError (naming no server path) when there is none."""
        from ..finetune.adapters import METADATA_FILE, WEIGHTS_FILE

        path = self.adapter_path(name)
        if not (path / METADATA_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise InputError(f"no adapter named {name!r} here (see the adapters list)")
        return path

    def adapter_metadata(self, name: str) -> dict:
        from ..finetune.adapters import read_metadata

        path = self.existing_adapter(name)
        try:
            return read_metadata(path)
        except InputError:
            raise InputError(f"adapter {name!r} has no readable metadata") from None

    def adapter(self, name: str):
        """``(model, AdapterInfo)`` of the adapter ``name`` in the adapter folder (reloaded when it changed)."""
        from ..finetune.adapters import METADATA_FILE, load_adapted_model, read_metadata

        path = self.existing_adapter(name)
        stamp = (path / METADATA_FILE).stat().st_mtime_ns
        with self._load_lock:
            cached = self._adapters.get(name)
            if cached is not None and cached[0] == stamp:
                return cached[1], cached[2]
            base = read_metadata(path).get("base_model", {}).get("name", self.default_model)
            model, info = load_adapted_model(path, model_name=base, checkpoint=self.model_specs.get(base),
                                             device=str(self.device), backend=self.backend, precision=self.precision)
            self._adapters[name] = (stamp, model, info)
            return model, info

    def adapters(self) -> list[dict]:
        """Adapters in the adapter folder: ``{"name", "metadata"}`` each (unreadable ones skipped)."""
        from ..finetune.adapters import METADATA_FILE, WEIGHTS_FILE

        found = []
        if self.adapter_dir.is_dir():
            for path in sorted(self.adapter_dir.iterdir()):
                if ADAPTER_NAME.match(path.name) and (path / WEIGHTS_FILE).is_file():
                    try:
                        metadata = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
                    except (OSError, ValueError):
                        continue
                    found.append({"name": path.name, "metadata": metadata})
        return found

    # ------------------------------------------------------------------ volumes
    def add_volume(self, volume_id: str, image: MedicalImage) -> None:
        """Keep ``image`` under ``volume_id``, dropping the least recently used volumes over budget."""
        nbytes = int(image.array.nbytes)
        if nbytes > self.limits.volume_memory_bytes:
            raise InputError(f"volume of {nbytes} bytes is over the service's memory budget")
        with self._lock:
            if volume_id in self._volumes:
                return
            self._volumes[volume_id] = _Volume(image, nbytes)
            while len(self._volumes) > 1 and (
                    sum(v.nbytes for v in self._volumes.values()) > self.limits.volume_memory_bytes
                    or len(self._volumes) > self.limits.max_volumes):
                self.delete_volume(next(iter(self._volumes)))

    def volume(self, volume_id: str) -> MedicalImage:
        with self._lock:
            entry = self._volumes.get(volume_id)
            if entry is None:
                raise KeyError(volume_id)
            self._volumes.move_to_end(volume_id)
            return entry.image

    def has_volume(self, volume_id: str) -> bool:
        with self._lock:
            return volume_id in self._volumes

    def delete_volume(self, volume_id: str) -> bool:
        """Forget a volume, its sessions and their embeddings; False when it was not here."""
        with self._lock:
            if self._volumes.pop(volume_id, None) is None:
                return False
            for key in [k for k in self._sessions if k[0] == volume_id]:
                self._sessions.pop(key).cache.clear()
            return True

    def volume_ids(self) -> list[str]:
        with self._lock:
            return list(self._volumes)

    # ------------------------------------------------------------------ sessions
    def session(self, volume_id: str, model: str | None = None, adapter: str | None = None,
                intensity: dict | None = None):
        """``(SegmentationSession, adapter_info or None)`` for a volume and a model or an adapter."""
        from ..inference import SegmentationSession
        from ..preprocessing import IntensitySettings

        image = self.volume(volume_id)
        info = None
        if adapter is not None:
            loaded, info = self.adapter(adapter)
            settings = info.intensity if intensity is None else IntensitySettings.from_dict(intensity)
            model_key = f"adapter:{adapter}:{loaded.cache_token}"
        else:
            loaded = self.model(model)
            settings = IntensitySettings.from_dict(intensity or {})
            model_key = f"model:{model or self.default_model}"
        key = (volume_id, model_key, json.dumps(settings.to_dict(), sort_keys=True))
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = SegmentationSession(loaded, image, axis="auto", intensity=settings, cache=self.cache)
                self._sessions[key] = session
            return session, info


class FocusWorker:
    """Embeds the slice a viewer shows, then its neighbours, on one background thread.

    A new focus replaces the old plan (the user scrolled on). Each slice takes an interactive
    turn on the model (it goes before a running job's next slice). Slices are embedded with
    :meth:`SegmentationSession.embedding_along`, which is thread-safe and never computes a slice
    twice when a prompt asks for the same one meanwhile.
    """

    def __init__(self, turns: ModelTurns | None = None) -> None:
        self.turns = turns or ModelTurns()
        self._plan: list[tuple[object, int, int]] = []
        self._condition = threading.Condition()
        self._stopped = False
        self.embedded = 0
        self._thread = threading.Thread(target=self._run, name="medfmsegment-focus", daemon=True)
        self._thread.start()

    def focus(self, session, voxel_axis: int, index: int, radius: int) -> int:
        """Plan slice ``index`` along ``voxel_axis`` and ``radius`` neighbours each side; returns
        how many of them are not embedded yet."""
        from ..inference.prefetch import nearest_first

        size = session.image.geometry.size[voxel_axis]
        plan = [(session, voxel_axis, i) for i in nearest_first(int(index), radius, size)
                if (voxel_axis, i) not in session.cache]
        with self._condition:
            self._plan = plan
            self._condition.notify_all()
        return len(plan)

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._plan = []
            self._condition.notify_all()

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._plan or self._stopped)
                if self._stopped:
                    return
                session, voxel_axis, index = self._plan.pop(0)
            try:
                with self.turns.interactive():  # before a running job's next slice
                    session.embedding_along(voxel_axis, index)
                self.embedded += 1
            except Exception:  # noqa: BLE001 - a failed look-ahead costs only the prompt's own encoding
                continue
