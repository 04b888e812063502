"""The embedding store: slice embeddings computed once, kept under one memory budget.

:class:`EmbeddingCache` is a byte-bounded LRU that many sessions may share;
:class:`SessionCache` is one session's view of it; :class:`SliceEmbedder` cuts slices out of a
normalised volume along any voxel axis and embeds them, never twice at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Sequence

import torch

from ..errors import InputError
from ..geometry import in_plane_axes, slice_from_volume, voxel_order
from ..models import PromptableModel
from ..preprocessing import SliceTransform
from .settings import PredictorSettings, ProgressCallback, check_cancel

__all__ = ["EmbeddingCache", "SessionCache", "SliceEmbedder", "cuda_batch_bucket"]


def _nbytes(value: torch.Tensor) -> int:
    return value.element_size() * value.nelement()


class EmbeddingCache:
    """LRU cache of slice embeddings bounded by bytes; thread-safe.

    One cache can serve many sessions (volumes, models), so that one memory budget bounds them
    all, as the Slicer module does: each session sees it through a :class:`SessionCache`, whose
    keys carry the session's volume and model tokens.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += _nbytes(value)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= _nbytes(old)

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._items

    def keys(self) -> list[tuple]:
        """The cached keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def discard(self, predicate: Callable[[tuple], bool]) -> int:
        """Drop the entries whose key satisfies ``predicate``; returns how many were dropped."""
        with self._lock:
            doomed = [key for key in self._items if predicate(key)]
            for key in doomed:
                self._bytes -= _nbytes(self._items.pop(key))
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


class SessionCache:
    """One session's view of an :class:`EmbeddingCache`, possibly shared with other sessions.

    The session asks by ``(voxel_axis, slice_index)``; the store holds ``(volume token, model
    token, voxel_axis, slice_index)``: the volume token is unique to the session (its image and
    intensity window), the model token to the loaded model or adapter
    (:attr:`PromptableModel.cache_token`). Hits and misses are counted per session.
    """

    def __init__(self, store: EmbeddingCache, namespace: tuple) -> None:
        self.store = store
        self.namespace = namespace
        self.hits = 0
        self.misses = 0

    def _full(self, key: tuple) -> tuple:
        return self.namespace + key

    def _owns(self, full_key: tuple) -> bool:
        return full_key[:len(self.namespace)] == self.namespace

    def get(self, key: tuple) -> torch.Tensor | None:
        value = self.store.get(self._full(key))
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        self.store.put(self._full(key), value)

    def __contains__(self, key: tuple) -> bool:
        return self._full(key) in self.store

    def keys(self) -> list[tuple]:
        """This session's cached keys, ``(voxel_axis, slice_index)``, least recently used first."""
        n = len(self.namespace)
        return [key[n:] for key in self.store.keys() if self._owns(key)]

    def __len__(self) -> int:
        return len(self.keys())

    @property
    def max_bytes(self) -> int:
        """The budget of the whole store (shared by every session on it)."""
        return self.store.max_bytes

    def clear(self) -> None:
        """Drop this session's embeddings (other sessions' stay)."""
        self.store.discard(self._owns)


def cuda_batch_bucket(count: int, limit: int) -> int:
    """Batch size to run ``count`` slices at on a GPU: the next power of two, at most ``limit``
    (and never below ``count``).

    Few distinct shapes mean few cuDNN algorithm searches under ``cudnn.benchmark`` (a search
    runs for each new input shape of every convolution), at a cost of at most twice the encoder
    work on the last, partial batch.
    """
    if count <= 0:
        raise ValueError("count must be positive")
    bucket = 1 << (count - 1).bit_length()
    return max(count, min(bucket, limit))


class SliceEmbedder:
    """Embeds slices of one normalised volume along any voxel axis, through a :class:`SessionCache`.

    Args:
        model: The promptable model whose image encoder runs.
        volume: The normalised ``(K, J, I)`` float32 volume in [0, 1], on the model's device.
        spacing: Voxel size ``(I, J, K)`` in mm (slices keep their physical aspect ratio).
        cache: Where embeddings are kept.
        settings: The batch size of prefetching.

    Every method takes the voxel axis explicitly and is safe to call from several threads: a slice
    that another thread is embedding is waited for, not computed twice.
    """

    def __init__(self, model: PromptableModel, volume: torch.Tensor, spacing: Sequence[float],
                 cache: SessionCache, settings: PredictorSettings) -> None:
        self.model = model
        self.volume = volume
        self.spacing = tuple(float(v) for v in spacing)
        self.size = voxel_order(volume.shape)
        self.cache = cache
        self.settings = settings
        self._transforms: dict[int, SliceTransform] = {}
        self._inflight: dict[tuple, threading.Event] = {}
        self._inflight_lock = threading.Lock()

    def transform(self, voxel_axis: int) -> SliceTransform:
        """The slice <-> model-input transform of slices normal to ``voxel_axis``."""
        transform = self._transforms.get(voxel_axis)
        if transform is None:
            row_axis, col_axis = in_plane_axes(voxel_axis)
            transform = SliceTransform.create(self.size[row_axis], self.size[col_axis], self.model.image_size,
                                              (self.spacing[row_axis], self.spacing[col_axis]))
            self._transforms[voxel_axis] = transform
        return transform

    def slice_tensor(self, voxel_axis: int, index: int) -> torch.Tensor:
        """Normalised 2D slice ``(rows, cols)`` as a tensor on the model's device."""
        return slice_from_volume(self.volume, voxel_axis, index)

    def is_embedded(self, voxel_axis: int, index: int) -> bool:
        return (voxel_axis, int(index)) in self.cache

    def store(self, voxel_axis: int, index: int, embedding: torch.Tensor) -> None:
        """Cache an embedding computed elsewhere (e.g. by a model sharing this one's encoder)."""
        self.cache.put((voxel_axis, int(index)), embedding)

    @torch.inference_mode()
    def embedding(self, voxel_axis: int, index: int) -> torch.Tensor:
        """``(1, C, 64, 64)`` embedding of slice ``index`` normal to ``voxel_axis``, computed on first use."""
        size = self.size[voxel_axis]
        if not 0 <= index < size:
            raise InputError(f"slice {index} is outside 0..{size - 1}")
        key = (voxel_axis, int(index))
        while True:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
            with self._inflight_lock:
                pending = self._inflight.get(key)
                if pending is None:
                    done = self._inflight[key] = threading.Event()
            if pending is not None:
                pending.wait()
                continue  # normally cached now; if that thread failed, compute it here
            try:
                embedding = self.encode(voxel_axis, [int(index)])[0][None]
                self.cache.put(key, embedding)
                return embedding  # even if the cache, at its budget, let it go at once
            finally:
                with self._inflight_lock:
                    del self._inflight[key]
                done.set()

    def encode(self, voxel_axis: int, indices: Sequence[int], batch_limit: int | None = None) -> torch.Tensor:
        """``(len(indices), C, 64, 64)`` float32 embeddings of slices normal to ``voxel_axis``.

        On CUDA the slices are cut and resized on the GPU, the encoder runs in float16
        (:meth:`PromptableModel.encode_half`) and the batch is padded to
        :func:`cuda_batch_bucket` of ``batch_limit`` (None: the settings' batch size).
        """
        transform = self.transform(voxel_axis)
        raw = torch.stack([slice_from_volume(self.volume, voxel_axis, i) for i in indices])
        device = self.model.device
        if device.type == "cuda":
            count = len(indices)
            limit = self.settings.batch_size_for(device) if batch_limit is None else batch_limit
            padded = cuda_batch_bucket(count, limit)
            if padded > count:  # repeat the last slice; its extra embeddings are dropped
                raw = torch.cat([raw, raw[-1:].expand(padded - count, *raw.shape[1:])])
            return self.model.encode_half(transform.images_to_input(raw)).float()[:count]
        return self.model.encode(transform.images_to_input(raw).to(device))

    @torch.inference_mode()
    def embed(self, voxel_axis: int, indices: Sequence[int], batch_size: int = 1,
              progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> None:
        """Embed the given slices that are not cached yet, ``batch_size`` at a time."""
        todo = [int(i) for i in indices if not self.is_embedded(voxel_axis, int(i))]
        for start in range(0, len(todo), batch_size):
            check_cancel(cancel, "embedding")
            chunk = todo[start:start + batch_size]
            for i, embedding in zip(chunk, self.encode(voxel_axis, chunk, batch_size)):
                self.cache.put((voxel_axis, i), embedding[None])
            if progress is not None:
                progress(min(start + batch_size, len(todo)), len(todo))

    def prefetch(self, voxel_axis: int, indices: Sequence[int], progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None) -> None:
        """Embed ``indices`` ahead in batches where that pays (a GPU); a no-op on a CPU by default."""
        batch_size = self.settings.batch_size_for(self.model.device)
        if batch_size > 0:
            self.embed(voxel_axis, indices, batch_size=batch_size, progress=progress, cancel=cancel)
