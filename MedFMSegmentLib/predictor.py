"""The predictor session: load a volume once, embed slices lazily, segment from prompts.

This is the API the command line, batch work and the Slicer module all use::

    model = load_model("litemedsam")
    session = SegmentationSession(model, read_image("case.nii.gz"), axis="axial")
    mask = session.segment(Prompts(box=(10, 12, 4, 30, 40, 20)))   # (K, J, I) bool

Slice embeddings are computed on first use and kept in a bounded cache, so a second prompt on
the same slice costs only the prompt decoder.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .acceleration import quiet_torch_threads
from .errors import CancelledError, InputError
from .geometry import in_plane_axes, slice_from_volume, slice_into_volume, to_slice_coords
from .io import MedicalImage
from .models import PromptableModel
from .decoder_step import DecoderStep, StepStats
from .preprocessing import IntensitySettings, SliceTransform, apply_intensity_window, intensity_window
from .prompts import (Box2D, Prompts, apply_click_constraints, components_touching, expand_box, mask_bbox,
                      smooth_box_track)
from .tracking import track_shift

ProgressCallback = Callable[[int, int], None]

#: Logit written where a strategy did not segment a slice (sigmoid ~2e-9).
NOT_SEGMENTED_LOGIT = -20.0
BOX3D_STRATEGIES = ("auto", "propagate", "consensus")


@dataclass
class PredictorSettings:
    """Tunable behaviour of box refinement, click handling and 3D propagation.

    Attributes:
        box_margin_px: Margin (model-input pixels) added around a mask's tight box when it is
            turned back into a prompt; LiteMedSAM was trained on boxes a few pixels loose.
        user_box_margin_px: Margin (model-input pixels) added to boxes the user gives: LiteMedSAM
            saw jittered, slightly loose boxes in training; on 10 HC18 images a tight box gave
            Dice 0.893 and the same box 3 input pixels looser 0.913.
        refine_iterations: Times a box is replaced by the predicted mask's own box plus margin
            (0 by default: on HC18 it lowered tight-box Dice by about 0.01).
        click_box_sizes: Sides of the candidate boxes centred on clicks, as fractions of the
            model input (see ``SegmentationSession._clicks_to_box``).
        track_radius_px: Search radius (model-input pixels) for following a structure's in-plane
            motion from slice to slice during propagation (0 turns tracking off).
        min_area_px: Propagation stops on a slice whose mask has fewer pixels.
        min_overlap: Propagation stops when a slice's mask covers less than this fraction of the
            previous slice's mask (the model jumped to another structure).
        cache_bytes: Memory budget of the embedding cache (None: 1 GiB on a CPU; on a GPU a
            quarter of its memory, at most 8 GiB, so that a 300-slice CT, 1.2 GB of float32
            embeddings, stays cached: with 1 GiB, propagation on an H200 re-embedded 89 evicted
            slices one by one, ``bench/results/gpu_h200_profile_ct.txt``).
        embed_batch_size: Slices embedded ahead in batches before a 3D or automatic run
            (None: 16 on a GPU, 0 = lazily on a CPU).
        box3d_strategy: How a box spanning several slices on every axis is segmented:
            ``"propagate"`` (slice by slice along one axis), ``"consensus"`` (three axes
            combined, about 4x the encoder work: see :meth:`SegmentationSession.segment`), or
            ``"auto"`` (default): consensus for a box that spans at most
            ``consensus_max_slices`` slices over its three sides, else propagate. On the benchmark
            hippocampi consensus gives 0.725 against 0.588 (``bench_core.py``, bf16; their label
            boxes' sides sum to 73-98 voxels over all 200 MSD cases); on a 300 x 512 x 512 CT box it would embed 1324 slices
            instead of 300.
        consensus_rounds: Box re-placement rounds of the ``"consensus"`` strategy. Each round
            costs only decoder calls on slices already embedded (well under a second for a
            hippocampus box on the CPU). One-off trial, bf16 on the 2-core EPYC: 3 rounds -> 6
            rounds moved the mean Dice from 0.690 to 0.697 on the 20 benchmark cases (better on
            13, worse on 7) and from 0.689 to 0.703 on 10 held-out ones (better on 4, worse on 5).
        consensus_max_slices: The ``"auto"`` strategy's limit: the box's sides in voxels, summed
            (the slices consensus embeds). 192 bounds consensus at about a minute of encoder
            time on the 2-core CPU (arithmetic: 192 x ``bench_core``'s 278 ms per slice).
        consensus_three_axis_rounds: Further rounds of the ``"consensus"`` strategy that also
            re-box the box's middle axis (see :meth:`SegmentationSession._segment_box_consensus`).
            Decoder calls only. One-off trials, bf16 on the 2-core EPYC, after the 6 rounds above:
            0, 1, 2, 4, 6 rounds gave 0.697, 0.709, 0.715, 0.723, 0.727 on the 20 benchmark cases
            and 0.710, 0.720, 0.722, 0.724, 0.726 on 20 others (``bench_core.py --offset 5``).
    """

    box_margin_px: float = 5.0
    user_box_margin_px: float = 3.0
    refine_iterations: int = 0
    click_box_sizes: tuple[float, ...] = (0.1, 0.2, 0.3, 0.45, 0.6, 0.8)
    min_area_px: int = 3
    track_radius_px: float = 15.0
    min_overlap: float = 0.3
    cache_bytes: int | None = None
    embed_batch_size: int | None = None
    box3d_strategy: str = "auto"
    consensus_max_slices: int = 192
    consensus_rounds: int = 6
    consensus_three_axis_rounds: int = 6

    def __post_init__(self) -> None:
        if self.box3d_strategy not in BOX3D_STRATEGIES:
            raise InputError(f"3D box strategy must be one of {', '.join(BOX3D_STRATEGIES)}, "
                             f"got {self.box3d_strategy!r}")
        if self.consensus_max_slices < 0:
            raise InputError(f"consensus max slices must be 0 or more, got {self.consensus_max_slices}")
        if self.consensus_rounds < 0:
            raise InputError(f"consensus rounds must be 0 or more, got {self.consensus_rounds}")
        if self.consensus_three_axis_rounds < 0:
            raise InputError(f"consensus three-axis rounds must be 0 or more, got {self.consensus_three_axis_rounds}")

    def batch_size_for(self, device: torch.device) -> int:
        """Slices embedded ahead per batch: 16 on a GPU, 0 (lazily, one by one) on a CPU, where
        batching does not pay and propagation may stop before the planned range ends."""
        if self.embed_batch_size is not None:
            return self.embed_batch_size
        return 16 if device.type == "cuda" else 0

    def cache_bytes_for(self, device: torch.device) -> int:
        """Embedding cache budget on ``device`` (see ``cache_bytes``)."""
        if self.cache_bytes is not None:
            return self.cache_bytes
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            return int(min(8 << 30, total // 4))
        return 1 << 30


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
        size = value.element_size() * value.nelement()
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.element_size() * old.nelement()

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
                old = self._items.pop(key)
                self._bytes -= old.element_size() * old.nelement()
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
    work on the last, partial batch. On an H200 the first hippocampus 3D box in a process took
    4.3 s with the benchmark flag on against 2.3 s off before this bucketing, and 3.9 s against
    2.3 s after it; later runs took 0.085 s either way (``gpu_h200_s5*.json``), so the cost of
    each search was not measured in isolation.
    """
    if count <= 0:
        raise ValueError("count must be positive")
    bucket = 1 << (count - 1).bit_length()
    return max(count, min(bucket, limit))


class SegmentationSession:
    """One image, one model: lazily embedded slices and prompt-to-mask prediction.

    Args:
        model: A loaded :class:`~MedFMSegmentLib.models.PromptableModel`.
        image: The image, ``(K, J, I)`` with its geometry.
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"`` (the voxel axis nearest to that
            orientation's normal), a voxel axis number 0 (I), 1 (J), 2 (K), or ``"auto"``: each
            :meth:`segment` call picks the axis from its prompts (see :func:`choose_axis`).
            2D images always use K.
        intensity: How voxel values are scaled to [0, 1].
        settings: Refinement and propagation behaviour.
        cache: An embedding cache to share with other sessions under one memory budget (the
            Slicer module shares one across volumes); by default the session has its own, of
            ``settings.cache_bytes``.
    """

    def __init__(self, model: PromptableModel, image: MedicalImage, axis: str | int = "auto",
                 intensity: IntensitySettings | None = None, settings: PredictorSettings | None = None,
                 cache: EmbeddingCache | None = None) -> None:
        self.model = model
        self.image = image
        self.settings = settings or PredictorSettings()
        self.intensity = intensity or IntensitySettings()
        device = model.device
        raw = np.asarray(image.array, dtype=np.float32)
        low, high = intensity_window(raw, self.intensity, image.modality)
        self._volume: np.ndarray | None = None
        if device.type == "cuda":
            # The normalised volume lives on the GPU, where embedding and tracking read it; the
            # host copy is made only if something asks for it (see ``volume``).
            self.device_volume = apply_intensity_window(torch.from_numpy(raw).to(device), low, high)
        else:
            self._volume = apply_intensity_window(raw, low, high)
            self.device_volume = torch.from_numpy(self._volume)  # the same memory
        self._decoder_steps: dict[int, DecoderStep] = {}
        self._transforms: dict[int, SliceTransform] = {}
        # Slices being embedded right now, by cache key: another thread asking for one of them
        # waits for that result instead of computing it again (see embedding_along).
        self._inflight: dict[tuple, threading.Event] = {}
        self._inflight_lock = threading.Lock()
        store = cache if cache is not None else EmbeddingCache(self.settings.cache_bytes_for(model.device))
        self.cache = SessionCache(store, (uuid.uuid4().hex, model.cache_token))
        self.voxel_axis = 2
        self.auto_axis = False
        self._mirrors: dict[int, SegmentationSession] = {}
        self.set_axis(axis)

    # ------------------------------------------------------------------ slices
    def set_axis(self, axis: str | int) -> None:
        """Choose the slicing direction (cached embeddings of other axes are kept)."""
        self.auto_axis = axis == "auto"
        if self.image.geometry.size[2] == 1 or self.auto_axis:
            self._use_voxel_axis(2)
        elif isinstance(axis, (int, np.integer)):
            if axis not in (0, 1, 2):
                raise InputError(f"voxel axis must be 0, 1 or 2, got {axis}")
            self._use_voxel_axis(int(axis))
        else:
            try:
                self._use_voxel_axis(self.image.geometry.voxel_axis_for(axis))
            except ValueError as exc:
                raise InputError(str(exc)) from None

    def _use_voxel_axis(self, voxel_axis: int) -> None:
        """Slice along ``voxel_axis`` (the ``auto`` setting is left as it is)."""
        self.voxel_axis = voxel_axis
        self.transform = self.transform_for(voxel_axis)

    def transform_for(self, voxel_axis: int) -> SliceTransform:
        """The slice <-> model-input transform of slices along ``voxel_axis`` (any axis, not only
        the current one)."""
        transform = self._transforms.get(voxel_axis)
        if transform is None:
            row_axis, col_axis = in_plane_axes(voxel_axis)
            spacing = self.image.geometry.spacing
            size = self.image.geometry.size
            transform = SliceTransform.create(size[row_axis], size[col_axis], self.model.image_size,
                                              (spacing[row_axis], spacing[col_axis]))
            self._transforms[voxel_axis] = transform
        return transform

    @property
    def volume(self) -> np.ndarray:
        """The normalised ``(K, J, I)`` float32 volume in [0, 1], on the host."""
        if self._volume is None:
            self._volume = self.device_volume.cpu().numpy()
        return self._volume

    @property
    def slice_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the slices along the current axis."""
        return (self.transform.rows, self.transform.cols)

    @property
    def num_slices(self) -> int:
        return self.image.geometry.size[self.voxel_axis]

    def slice_image(self, index: int) -> np.ndarray:
        """Normalised 2D slice ``(rows, cols)`` at ``index`` along the current axis."""
        return slice_from_volume(self.volume, self.voxel_axis, index)

    def slice_tensor(self, index: int) -> torch.Tensor:
        """Normalised 2D slice ``(rows, cols)`` as a tensor where the volume lives (the model's device)."""
        return slice_from_volume(self.device_volume, self.voxel_axis, index)

    def _key(self, index: int) -> tuple:
        return (self.voxel_axis, int(index))

    def is_embedded(self, index: int) -> bool:
        return self._key(index) in self.cache

    def store_embedding(self, index: int, embedding: torch.Tensor) -> None:
        """Cache an embedding computed elsewhere for slice ``index`` of the current axis, e.g. by
        another session whose model shares this one's frozen image encoder."""
        self.cache.put(self._key(index), embedding)

    def embedding(self, index: int) -> torch.Tensor:
        """``(1, C, 64, 64)`` embedding of one slice along the current axis, computed on first use."""
        return self.embedding_along(self.voxel_axis, index)

    @torch.inference_mode()
    def embedding_along(self, voxel_axis: int, index: int) -> torch.Tensor:
        """``(1, C, 64, 64)`` embedding of slice ``index`` along ``voxel_axis``, computed on first use.

        Safe to call from several threads (e.g. :class:`~MedFMSegmentLib.background.BackgroundEmbedder`
        beside the prompts of the UI thread): it never reads or changes the session's current axis,
        and a slice that another thread is embedding is waited for, not computed twice.
        """
        size = self.image.geometry.size[voxel_axis]
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
                embedding = self._encode_slices(voxel_axis, [int(index)])[0][None]
                self.cache.put(key, embedding)
                return embedding  # even if the cache, at its budget, let it go at once
            finally:
                with self._inflight_lock:
                    del self._inflight[key]
                done.set()

    def _encode_slices(self, voxel_axis: int, indices: Sequence[int], batch_limit: int | None = None) -> torch.Tensor:
        """``(len(indices), C, 64, 64)`` float32 embeddings of slices along ``voxel_axis``.

        On CUDA the batch is padded to :func:`cuda_batch_bucket` of ``batch_limit`` (None: the
        settings' batch size).
        """
        transform = self.transform_for(voxel_axis)
        raw = torch.stack([slice_from_volume(self.device_volume, voxel_axis, i) for i in indices])
        if self.model.device.type == "cuda":
            count = len(indices)
            limit = self.settings.batch_size_for(self.model.device) if batch_limit is None else batch_limit
            padded = cuda_batch_bucket(count, limit)
            if padded > count:  # repeat the last slice; its extra embeddings are dropped
                raw = torch.cat([raw, raw[-1:].expand(padded - count, *raw.shape[1:])])
            return self.model.encode_half(transform.images_to_input(raw)).float()[:count]
        return self.model.encode(transform.images_to_input(raw).to(self.model.device))

    @torch.inference_mode()
    def embed_slices(self, indices: Sequence[int], batch_size: int = 1,
                     progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> None:
        """Embed the given slices that are not cached yet (batched: worth it on a GPU only).

        On CUDA the slices are cut and resized from the volume on the GPU and the encoder runs in
        float16 (see :meth:`PromptableModel.encode_half`); the cached embeddings are float32 on the
        device, so the decoder sees the same dtype everywhere.
        """
        todo = [int(i) for i in indices if not self.is_embedded(int(i))]
        for start in range(0, len(todo), batch_size):
            if cancel is not None and cancel.is_set():
                raise CancelledError("embedding cancelled")
            chunk = todo[start:start + batch_size]
            embeddings = self._encode_slices(self.voxel_axis, chunk, batch_size)
            for i, embedding in zip(chunk, embeddings):
                self.cache.put(self._key(i), embedding[None])
            if progress is not None:
                progress(min(start + batch_size, len(todo)), len(todo))

    def prefetch(self, indices: Sequence[int], progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None) -> None:
        """Embed ``indices`` ahead in batches where that pays (a GPU); a no-op on a CPU by default."""
        batch_size = self.settings.batch_size_for(self.model.device)
        if batch_size > 0:
            self.embed_slices(indices, batch_size=batch_size, progress=progress, cancel=cancel)

    def mirrored(self) -> "SegmentationSession":
        """A session on this image flipped left-right within every slice of the current axis
        (its columns reversed), same model, settings and slicing axis, sharing this session's
        embedding store (made once per axis, then reused): slice ``index`` of both shows the same
        anatomy, mirrored. Its image keeps this one's geometry, so its masks are mirrored too: flip
        their columns back before use. Test-time flip augmentation reads both (see :func:`~MedFMSegmentLib.finetune.automatic.segment_automatic`)."""
        import dataclasses

        mirror = self._mirrors.get(self.voxel_axis)
        if mirror is not None:
            return mirror
        _, column_axis = in_plane_axes(self.voxel_axis)
        array = np.flip(np.asarray(self.image.array), axis=2 - column_axis)  # (K, J, I): voxel axis v is array axis 2 - v
        image = dataclasses.replace(self.image, array=np.ascontiguousarray(array),
                                    source=f"{self.image.source} (mirrored)")
        mirror = SegmentationSession(self.model, image, self.voxel_axis, self.intensity, self.settings,
                                     cache=self.cache.store)
        self._mirrors[self.voxel_axis] = mirror  # later calls reuse its embeddings
        return mirror

    # ------------------------------------------------------------------ 2D prediction
    @torch.inference_mode()
    def predict_slice(self, index: int, box: Box2D | None = None,
                      positives: Sequence[Sequence[float]] = (), negatives: Sequence[Sequence[float]] = ()
                      ) -> np.ndarray:
        """Segment one slice from a box and/or clicks.

        Args:
            index: Slice index along the current axis.
            box: ``(col0, row0, col1, row1)`` inclusive, in slice pixels.
            positives, negatives: Clicks ``(col, row)`` in slice pixels.

        Returns:
            ``(rows, cols)`` boolean mask.

        Models trained with boxes only (LiteMedSAM, MedSAM) get clicks as a box: see
        :meth:`_clicks_to_box`. Negative clicks then remove the components they fall on.
        """
        if box is None and not positives:
            raise InputError("a slice prompt needs a box or a positive click")
        if self.model.spec.trained_with_points and (positives or negatives):
            mask = self.decode_slice(index, box, positives, negatives)
        else:
            if box is None:
                box = self._clicks_to_box(index, positives, negatives)
            else:
                box = expand_box(box, self.box_margin(self.settings.user_box_margin_px), self.slice_shape)
            mask = self.decode_slice(index, box)
            mask = self._refine(index, mask, limit=box, iterations=self.settings.refine_iterations)
        return apply_click_constraints(mask, positives, negatives)

    def decode_slice(self, index: int, box: Box2D | None = None, positives: Sequence = (), negatives: Sequence = ()
                     ) -> np.ndarray:
        """One decoder call on slice ``index``: exactly this box (slice pixels, no margin added, no
        refinement) and clicks, or no prompt at all (what adapters trained for automatic mode take).

        Returns:
            ``(rows, cols)`` boolean mask.
        """
        embedding = self.embedding(index)
        device = self.model.device
        if device.type == "cuda" and box is not None and not positives and not negatives:
            mask, _ = self.decoder_step()(embedding, box)  # one CUDA graph replay (see DecoderStep)
            return mask.cpu().numpy()
        t = self.transform
        boxes = None if box is None else torch.from_numpy(t.box_to_input(box))[None].to(device)
        points = labels = None
        if positives or negatives:
            coords = t.points_to_input(np.array(list(positives) + list(negatives), dtype=np.float32))
            points = torch.from_numpy(coords)[None].to(device)
            labels = torch.tensor([[1] * len(positives) + [0] * len(negatives)], device=device)
        logits, _ = self.model.decode(embedding, boxes=boxes, points=points, point_labels=labels)
        with quiet_torch_threads(self.model):
            return (t.logits_to_slice(logits)[0] > 0).cpu().numpy()

    @torch.inference_mode()
    def prompt_free_logits(self, index: int) -> np.ndarray:
        """``(rows, cols)`` float32 logits of one decoder call with no prompt on slice ``index`` (what
        adapters trained for automatic mode take); ``decode_slice(index)`` is these ``> 0``."""
        logits, _ = self.model.decode(self.embedding(index))
        with quiet_torch_threads(self.model):
            return self.transform.logits_to_slice(logits)[0].float().cpu().numpy()

    @torch.inference_mode()
    def decode_best_box(self, index: int, boxes: Sequence[Box2D]) -> tuple[np.ndarray, int]:
        """One decoder call on slice ``index`` with several candidate boxes (slice pixels, used as
        given); the decoder's own predicted IoU picks one.

        Returns:
            ``(mask, position)``: the ``(rows, cols)`` boolean mask of the picked box and its
            position in ``boxes``.
        """
        if not boxes:
            raise InputError("decode_best_box needs at least one box")
        if len(boxes) == 1:
            return self.decode_slice(index, boxes[0]), 0
        t = self.transform
        inputs = torch.from_numpy(np.stack([t.box_to_input(b) for b in boxes])).to(self.model.device)
        logits, iou = self.model.decode(self.embedding(index), boxes=inputs)
        best = int(torch.argmax(iou[:, 0].float()))
        with quiet_torch_threads(self.model):
            return (t.logits_to_slice(logits[best:best + 1])[0] > 0).cpu().numpy(), best

    def decode_logits(self, index: int, box: Box2D) -> np.ndarray:
        """``(rows, cols)`` float32 logits of one decoder call on slice ``index`` with exactly this
        box (slice pixels, no margin, no refinement); :meth:`decode_slice` is ``logits > 0``."""
        step = self.decoder_step()
        step(self.embedding(index), box)
        return step.logits.cpu().numpy().astype(np.float32, copy=True)

    def box_margin(self, input_px: float | None = None) -> tuple[float, float]:
        """Box margin in slice pixels (col, row) for ``input_px`` (default ``box_margin_px``) model-input pixels."""
        m = self.settings.box_margin_px if input_px is None else input_px
        return (m / self.transform.scale_cols, m / self.transform.scale_rows)

    def _refine(self, index: int, mask: np.ndarray, limit: Box2D | None, iterations: int) -> np.ndarray:
        """Re-prompt with the mask's own box (plus margin): a loose user box becomes a trained-like one."""
        shape = mask.shape
        for _ in range(iterations):
            tight = mask_bbox(mask)
            if tight is None:
                break
            box = expand_box(tight, self.box_margin(), shape, limit)
            refined = self.decode_slice(index, box)
            if not refined.any():
                break
            mask = refined
        return mask

    def _clicks_to_box(self, index: int, positives: Sequence[Sequence[float]],
                       negatives: Sequence[Sequence[float]]) -> Box2D:
        """Turn clicks into a box for a box-only model (LiteMedSAM gives Dice 0 on a bare click).

        Boxes of several sizes are centred on the clicks' extent; each is predicted, tightened to
        its mask's own box plus margin and predicted again. The box whose mask agrees best with
        the masks of the other sizes (mean IoU) wins: a structure that is really there comes out
        the same from several box sizes, while boxes that are too small give arbitrary blobs and
        boxes that are too large swallow neighbours. All candidates share one cached embedding,
        so this costs decoder calls only. Negative clicks pull box sides in so they stay outside.
        """
        rows, cols = self.transform.rows, self.transform.cols
        pts = np.asarray(positives, dtype=float).reshape(-1, 2)
        extent = (pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max())
        candidates: list[tuple[Box2D, np.ndarray]] = []
        for fraction in self.settings.click_box_sizes:
            half_c = fraction * self.model.image_size / self.transform.scale_cols / 2
            half_r = fraction * self.model.image_size / self.transform.scale_rows / 2
            box = expand_box(extent, (half_c, half_r), (rows, cols))
            box = expand_box(_limit_by_negatives(box, pts, negatives), 0, (rows, cols))
            mask = components_touching(self.decode_slice(index, box), pts)
            tight = mask_bbox(mask)
            if tight is None:
                continue
            box = expand_box(_limit_by_negatives(expand_box(tight, self.box_margin(), (rows, cols)), pts, negatives),
                             0, (rows, cols))
            mask = components_touching(self.decode_slice(index, box), pts)
            if mask.any():
                candidates.append((box, mask))
        if not candidates:
            return expand_box(extent, self.box_margin(), (rows, cols))
        if len(candidates) == 1:
            return candidates[0][0]
        masks = [m for _, m in candidates]
        agreement = [np.mean([_mask_iou(m, other) for other in masks if other is not m]) for m in masks]
        return candidates[int(np.argmax(agreement))][0]

    # ------------------------------------------------------------------ 3D
    def segment(self, prompts: Prompts, propagate: bool | None = None, progress: ProgressCallback | None = None,
                cancel: threading.Event | None = None, on_update: Callable | None = None) -> np.ndarray:
        """:meth:`_segment`; ``on_update(voxel_axis, index, plane)`` is called as each result slice is
        written (``voxel_axis`` 0 = I, 1 = J, 2 = K; ``plane`` as :func:`slice_from_volume` gives it)."""
        self._on_update = on_update
        try:
            return self._segment(prompts, propagate, progress, cancel)
        finally:
            self._on_update = None

    def _segment(self, prompts: Prompts, propagate: bool | None = None,
                 progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> np.ndarray:
        """Segment from voxel prompts; the result is a ``(K, J, I)`` boolean mask.

        * A box flat along the slicing axis, or clicks on one slice, segment that slice.
        * A box spanning several slices segments its middle slice, then propagates slice by slice
          within the box's range, each slice prompted with its neighbour's mask box.
        * ``propagate=True`` with a one-slice prompt propagates until the structure ends.
        * Clicks on several slices (no box) segment each clicked slice.
        * With ``settings.box3d_strategy == "consensus"`` (or ``"auto"`` and a box within
          ``settings.consensus_max_slices``), the axis left on ``"auto"`` and a box alone
          spanning several slices on every axis: see :meth:`_segment_box_consensus`.

        Args:
            prompts: Box and clicks in voxel indices (i, j, k).
            propagate: Force propagation on or off; None decides from the box.
            progress: Called with (slices done, slices planned) as slices are finished.
            cancel: Set it to stop; raises :class:`CancelledError`.
        """
        prompts.validate(self.image.geometry)
        if prompts.is_empty:
            raise InputError("at least one prompt is needed: a box or a positive click")
        if self.auto_axis:
            self._use_voxel_axis(choose_axis(prompts, self.image.geometry))
        axis = self.voxel_axis
        result = np.zeros(self.image.geometry.shape, dtype=bool)
        slice_pts = {"pos": [to_slice_coords(p, axis) for p in prompts.positives],
                     "neg": [to_slice_coords(p, axis) for p in prompts.negatives]}

        def clicks_on(index: int, kind: str) -> list[tuple[float, float]]:
            return [(c, r) for c, r, s in slice_pts[kind] if int(round(s)) == index]

        # Consensus picks its own axes: only when the axis is left to the session (not fixed by the
        # user or by an adapter trained on one orientation), for a box alone.
        if (prompts.box is not None and self.uses_consensus(prompts.box) and propagate is not False
                and self.auto_axis and not prompts.positives and not prompts.negatives
                and all(prompts.box[a + 3] > prompts.box[a] for a in range(3))):
            return self._segment_box_consensus(prompts.box, progress, cancel)
        if prompts.box is not None:
            box2d, first, last = box_on_axis(prompts.box, axis)
            if propagate is None:
                propagate = last > first
            if not propagate:
                planned = range(first, last + 1)
                self.prefetch(planned, cancel=cancel)
                for n, index in enumerate(planned):
                    _check(cancel)
                    plane = self.predict_slice(index, box2d, clicks_on(index, "pos"), clicks_on(index, "neg"))
                    self._write(result, index, plane)
                    if progress:
                        progress(n + 1, len(planned))
                return result
            self.prefetch(range(first, last + 1) if last > first else range(self.num_slices), cancel=cancel)
            start = (first + last) // 2
            start_mask = self.predict_slice(start, box2d, clicks_on(start, "pos"), clicks_on(start, "neg"))
            self._write(result, start, start_mask)
            limits = (first, last) if last > first else (0, self.num_slices - 1)
            self._propagate(result, start, start_mask, limits, box2d if last > first else None,
                            clicks_on, progress, cancel)
            return result

        clicked = sorted({int(round(s)) for _, _, s in slice_pts["pos"]})
        for n, index in enumerate(clicked):
            _check(cancel)
            plane = self.predict_slice(index, None, clicks_on(index, "pos"), clicks_on(index, "neg"))
            self._write(result, index, plane)
            if progress:
                progress(n + 1, len(clicked))
        if propagate and len(clicked) == 1:
            start = clicked[0]
            self._propagate(result, start, slice_from_volume(result, axis, start), (0, self.num_slices - 1),
                            None, clicks_on, progress, cancel)
        return result

    def uses_consensus(self, box: Sequence[float]) -> bool:
        """Whether the 3D box strategy in ``settings`` means consensus for this ``box``
        (i0, j0, k0, i1, j1, k1): always for ``"consensus"``, for ``"auto"`` when the box's three
        sides in voxels sum to at most ``settings.consensus_max_slices``."""
        strategy = self.settings.box3d_strategy
        if strategy == "auto":
            slices = sum(int(round(box[a + 3])) - int(round(box[a])) + 1 for a in range(3))
            return slices <= self.settings.consensus_max_slices
        return strategy == "consensus"

    def propagate_box_logits(self, box: Sequence[float], voxel_axis: int,
                             cancel: threading.Event | None = None) -> np.ndarray:
        """The ``propagate`` strategy for a 3D ``box`` along ``voxel_axis``, as ``(K, J, I)`` logits:
        the decoder's logits on every slice it segmented, :data:`NOT_SEGMENTED_LOGIT` elsewhere.

        The middle slice gets the box's own rectangle plus ``user_box_margin_px`` (no refinement),
        the others their neighbour's mask box, as in :meth:`segment`.
        """
        self._use_voxel_axis(voxel_axis)
        rect, first, last = box_on_axis(box, voxel_axis)
        self.prefetch(range(first, last + 1), cancel=cancel)
        logits = np.full(self.image.geometry.shape, NOT_SEGMENTED_LOGIT, dtype=np.float32)
        start = (first + last) // 2
        start_logits = self.decode_logits(
            start, expand_box(rect, self.box_margin(self.settings.user_box_margin_px), self.slice_shape))
        slice_into_volume(logits, voxel_axis, start, start_logits)
        result = np.zeros(self.image.geometry.shape, dtype=bool)
        self._propagate(result, start, start_logits > 0, (first, last), rect, lambda index, kind: [], None, cancel,
                        logits_out=logits)
        return logits

    def _segment_box_consensus(self, box: Sequence[float], progress: ProgressCallback | None,
                               cancel: threading.Event | None) -> np.ndarray:
        """The ``consensus`` strategy for a box spanning several slices on every axis.

        1. Propagate across the box's shortest physical side (the ``propagate`` result, kept as
           logits) and across its middle side (kept as a mask).
        2. On the slices across the longest side, a hippocampus-like structure is a compact blob,
           which LiteMedSAM segments well from a tight box (an exploration with the labels' own
           boxes found this axis far better than the shortest). Those boxes are read from where
           the two propagations agree, smoothed along the slices (:func:`smooth_box_track`),
           decoded, and the logits added to the first propagation's.
        3. Step 2 is repeated from the combined mask (``consensus_rounds`` times in all).
        4. Then ``consensus_three_axis_rounds`` more rounds: each slice across the middle side
           is also decoded, with the combined mask's own box on that slice (unsmoothed), and
           its logits join the sum. The propagation across the middle side placed its boxes from
           its neighbours' masks and drifted (0.50 on its own on the benchmark cases); boxes
           from the combined mask are far closer. A middle-side slice where the combined mask is
           empty adds :data:`NOT_SEGMENTED_LOGIT`, so it stays empty.

        Embeds the box's slices along all three axes (about 4x the ``propagate`` strategy's
        encoder work on a hippocampus box). On the 20 benchmark hippocampus cases steps 1-3 raised
        the mean 3D-box Dice from 0.580 to 0.699, and from 0.605 to 0.665 on 10 held-out cases,
        with 3 rounds in float32 (``bench/results/core_cpu_consensus*.json``); 6 rounds in bf16
        gave 0.697 on the 20 (``core_cpu_bf16_consensus6_s7.json``). Step 4 (6 rounds) raised it
        to 0.725 on those 20 and to 0.725 on 20 others
        (``core_cpu_bf16_consensus3ax*_s12.json``); its one-off trials are under
        :attr:`PredictorSettings.consensus_three_axis_rounds`.
        """
        geometry = self.image.geometry
        shortest, middle, longest = axes_by_extent(box, geometry.spacing)
        rounds = self.settings.consensus_rounds + self.settings.consensus_three_axis_rounds
        stages = 2 + rounds
        short_logits = self.propagate_box_logits(box, shortest, cancel)
        if progress:
            progress(1, stages)
        source = (short_logits > 0) & (self.propagate_box_logits(box, middle, cancel) > 0)
        if progress:
            progress(2, stages)
        self._use_voxel_axis(longest)
        rect, first, last = box_on_axis(box, longest)
        targets = list(range(first, last + 1))
        self.prefetch(targets, cancel=cancel)
        result = short_logits > 0
        for round_number in range(rounds):
            seen = [(index, mask_bbox(slice_from_volume(source, longest, index))) for index in targets]
            seen = [(index, b) for index, b in seen if b is not None]
            if not seen:
                break
            middle_logits = 0.0
            if round_number >= self.settings.consensus_rounds:
                middle_logits = self._rebox_logits(source, box, middle, cancel)
                self._use_voxel_axis(longest)
            boxes = smooth_box_track([i for i, _ in seen], [b for _, b in seen], targets)
            long_logits = np.full(geometry.shape, NOT_SEGMENTED_LOGIT, dtype=np.float32)
            for index, b in zip(targets, boxes):
                _check(cancel)
                slice_box = expand_box(b, self.box_margin(), self.slice_shape, rect)
                if slice_box[0] > slice_box[2] or slice_box[1] > slice_box[3]:
                    continue  # the fitted track left the 3D box here
                slice_into_volume(long_logits, longest, index, self.decode_logits(index, slice_box))
            result = source = (short_logits + middle_logits + long_logits) > 0
            if progress:
                progress(3 + round_number, stages)
        return result

    def _rebox_logits(self, mask: np.ndarray, box: Sequence[float], voxel_axis: int,
                      cancel: threading.Event | None) -> np.ndarray:
        """``(K, J, I)`` logits of every slice along ``voxel_axis`` within the 3D ``box`` where
        ``mask`` has voxels, each decoded with the mask's own box on it (plus ``box_margin_px``,
        clipped to the 3D box); :data:`NOT_SEGMENTED_LOGIT` elsewhere. Leaves the session on
        ``voxel_axis``."""
        self._use_voxel_axis(voxel_axis)
        rect, first, last = box_on_axis(box, voxel_axis)
        logits = np.full(mask.shape, NOT_SEGMENTED_LOGIT, dtype=np.float32)
        for index in range(first, last + 1):
            _check(cancel)
            tight = mask_bbox(slice_from_volume(mask, voxel_axis, index))
            if tight is None:
                continue
            slice_box = expand_box(tight, self.box_margin(), self.slice_shape, rect)
            slice_into_volume(logits, voxel_axis, index, self.decode_logits(index, slice_box))
        return logits

    def decoder_step(self) -> DecoderStep:
        """The propagation decoder step for the current axis (one per axis: its buffers are sized
        to the slices, and on CUDA it holds a captured graph)."""
        step = self._decoder_steps.get(self.voxel_axis)
        if step is None:
            step = self._decoder_steps[self.voxel_axis] = DecoderStep(self.model, self.transform)
        return step

    def _propagate(self, result: np.ndarray, start: int, start_mask: np.ndarray, limits: tuple[int, int],
                   limit_box: Box2D | None, clicks_on: Callable, progress: ProgressCallback | None,
                   cancel: threading.Event | None, logits_out: np.ndarray | None = None) -> None:
        """Walk from ``start`` towards both ends of ``limits``, each slice prompted by its neighbour.

        Masks stay on the model's device (:class:`DecoderStep`); the host sees each slice's area,
        overlap and box, and the mask once, when it is written.
        """
        planned = limits[1] - limits[0] + 1
        done = 1
        decode = self.decoder_step()
        shape = self.slice_shape
        settings = self.settings
        start_tensor = torch.from_numpy(np.ascontiguousarray(start_mask)).to(self.model.device)
        for step in (1, -1):
            decode.set_previous(start_tensor)
            previous_area, previous_box = int(start_mask.sum()), mask_bbox(start_mask)
            index = start + step
            while limits[0] <= index <= limits[1] and previous_area >= settings.min_area_px:
                _check(cancel)
                box = expand_box(previous_box, self.box_margin(), shape, limit_box)
                if settings.track_radius_px > 0:
                    dc, dr = self._track_shift(index - step, index, box)
                    box = expand_box((box[0] + dc, box[1] + dr, box[2] + dc, box[3] + dr), 0, shape, limit_box)
                mask, stats = decode(self.embedding(index), box)
                logits = decode.logits
                for _ in range(settings.refine_iterations):
                    if stats.box is None:
                        break
                    kept = (mask.clone(), stats, logits.clone())  # the step's buffers are reused
                    mask, stats = decode(self.embedding(index), expand_box(stats.box, self.box_margin(), shape,
                                                                           limit_box))
                    logits = decode.logits
                    if stats.area == 0:
                        mask, stats, logits = kept
                        break
                positives, negatives = clicks_on(index, "pos"), clicks_on(index, "neg")
                if positives or negatives:
                    plane = apply_click_constraints(mask.cpu().numpy(), positives, negatives)
                    mask = torch.from_numpy(plane).to(self.model.device)
                    stats = StepStats(int(plane.sum()), int((mask & decode.previous).sum()), mask_bbox(plane))
                overlap = stats.overlap / max(1, min(stats.area, previous_area))
                if stats.area < settings.min_area_px or overlap < settings.min_overlap:
                    break
                self._write(result, index, mask.cpu().numpy())
                if logits_out is not None:
                    slice_into_volume(logits_out, self.voxel_axis, index, logits.cpu().numpy())
                decode.set_previous(mask)
                previous_area, previous_box = stats.area, stats.box
                index += step
                done += 1
                if progress:
                    progress(done, planned)

    def _track_shift(self, source: int, target: int, box: Box2D) -> tuple[int, int]:
        """In-plane shift (columns, rows) that best maps the box's content on ``source`` onto ``target``
        (:func:`~MedFMSegmentLib.tracking.track_shift`, searching ``track_radius_px`` model-input
        pixels, 1 to 8 slice pixels). Measured on two hippocampus cases: 3D-box Dice 0.368 -> 0.431
        and 0.300 -> 0.395.
        """
        radius_c = int(np.clip(round(self.settings.track_radius_px / self.transform.scale_cols), 1, 8))
        radius_r = int(np.clip(round(self.settings.track_radius_px / self.transform.scale_rows), 1, 8))
        return track_shift(self.slice_tensor(source), self.slice_tensor(target), box, radius_c, radius_r)

    def _write(self, result: np.ndarray, index: int, plane: np.ndarray) -> None:
        slice_from_volume(result, self.voxel_axis, index)[...] = plane
        if getattr(self, "_on_update", None) is not None:
            self._on_update(self.voxel_axis, int(index), plane)


def axes_by_extent(box: Sequence[float], spacing: Sequence[float]) -> tuple[int, int, int]:
    """Voxel axes of a 3D ``box`` (i0, j0, k0, i1, j1, k1) from its shortest to its longest physical
    side; equal sides (to 1e-6 mm) put the higher axis first."""
    extent = (np.asarray(box[3:], float) - np.asarray(box[:3], float) + 1) * np.asarray(spacing, float)
    shortest, middle, longest = sorted((2, 1, 0), key=lambda a: (round(float(extent[a]), 6), -a))
    return shortest, middle, longest


def box_on_axis(box: Sequence[float], voxel_axis: int) -> tuple[Box2D, int, int]:
    """A voxel box ``(i0, j0, k0, i1, j1, k1)`` seen along ``voxel_axis``: its in-plane rectangle
    ``(col0, row0, col1, row1)`` and its first and last slice index."""
    lower, upper = to_slice_coords(box[:3], voxel_axis), to_slice_coords(box[3:], voxel_axis)
    return (lower[0], lower[1], upper[0], upper[1]), int(lower[2]), int(upper[2])


def choose_axis(prompts: Prompts, geometry) -> int:
    """The voxel axis to slice along for these prompts (what ``axis="auto"`` uses).

    * A box flat along one voxel axis was drawn on a slice of that axis: use it.
    * A box spanning several slices on every axis: slice across its shortest physical side.
      Each slice then holds the structure's two longest extents, so the 2D box the model gets
      on the middle slice is close to tight, and propagation takes the fewest steps (drift
      accumulates per step). On the 20 benchmark hippocampus MRI cases (long axis
      anterior-posterior) the 3D-box mean Dice rose from 0.502 (axial) to 0.580
      (``bench/results/core_cpu.json``, ``core_cpu_auto_axis.json``).
    * Clicks only: the axis on which all clicks share one slice, K first; else K.
    """
    if geometry.size[2] == 1:
        return 2
    if prompts.box is not None:
        lower, upper = np.asarray(prompts.box[:3], float), np.asarray(prompts.box[3:], float)
        extent = upper - lower
        flat = [a for a in (2, 1, 0) if extent[a] == 0]
        if flat:
            return flat[0]
        physical = (extent + 1) * np.asarray(geometry.spacing, float)
        # Prefer K, then J, then I on (near) ties so that a cube keeps the usual axial slicing.
        return min((2, 1, 0), key=lambda a: (round(float(physical[a]), 6), -a))
    clicks = np.asarray(list(prompts.positives) + list(prompts.negatives), float).reshape(-1, 3)
    for a in (2, 1, 0):
        if len(np.unique(np.round(clicks[:, a]))) == 1:
            return a
    return 2


def _limit_by_negatives(box: Box2D, positives: np.ndarray, negatives: Sequence[Sequence[float]]) -> Box2D:
    """Pull box sides in so that no negative click lies inside the box, on the side away from the clicks."""
    c0, r0, c1, r1 = box
    pc0, pr0 = positives[:, 0].min(), positives[:, 1].min()
    pc1, pr1 = positives[:, 0].max(), positives[:, 1].max()
    for nc, nr in negatives:
        if not (c0 <= nc <= c1 and r0 <= nr <= r1):
            continue
        # Move the side that gives up the least area while keeping every positive click inside.
        options = []
        if nc < pc0:
            options.append(((nc + 1 - c0) * (r1 - r0), (nc + 1, r0, c1, r1)))
        if nc > pc1:
            options.append(((c1 - nc + 1) * (r1 - r0), (c0, r0, nc - 1, r1)))
        if nr < pr0:
            options.append(((nr + 1 - r0) * (c1 - c0), (c0, nr + 1, c1, r1)))
        if nr > pr1:
            options.append(((r1 - nr + 1) * (c1 - c0), (c0, r0, c1, nr - 1)))
        if options:
            c0, r0, c1, r1 = min(options)[1]
    return (c0, r0, c1, r1)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError("segmentation cancelled")
