"""The segmentation session: one image, one model; set the image once, then predict from prompts.

::

    model = load_model("litemedsam")
    session = SegmentationSession(model, read_image("case.nii.gz"), axis="axial")
    mask = session.segment(Prompts(box=(10, 12, 4, 30, 40, 20)))   # (K, J, I) bool

Slice embeddings are computed on first use and kept in a bounded cache, so a second prompt on the
same slice costs only the prompt decoder. The session is a facade: the embedding store
(:mod:`.embeddings`), slice prompting (:mod:`.slices`) and the 3D strategies (:mod:`.propagate`,
:mod:`.consensus`) do the work and take the voxel axis explicitly. The session's own axis is
fixed at construction (or by :meth:`SegmentationSession.set_axis`); with ``axis="auto"`` each
:meth:`~SegmentationSession.segment` call picks an axis for itself and changes nothing.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError
from ..geometry import box_on_axis, mirror_slice_columns, slice_from_volume, slice_into_volume, to_slice_coords
from ..io import MedicalImage
from ..models import PromptableModel
from ..preprocessing import IntensitySettings, SliceTransform, apply_intensity_window, intensity_window
from ..prompts import Box2D, Prompts
from .axes import choose_axis, resolve_axis
from .consensus import segment_box_consensus
from .embeddings import EmbeddingCache, SessionCache, SliceEmbedder
from .propagate import propagate, propagate_box_logits
from .settings import PredictorSettings, ProgressCallback, UpdateCallback, check_cancel
from .sparse import segment_box_sparse
from .slices import SliceDecoder

__all__ = ["SegmentationSession"]


class SegmentationSession:
    """One image, one model: lazily embedded slices and prompt-to-mask prediction.

    Args:
        model: A loaded :class:`~MedFMSegmentLib.models.PromptableModel`.
        image: The image, ``(K, J, I)`` with its geometry.
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"`` (the voxel axis nearest to that
            orientation's normal), a voxel axis number 0 (I), 1 (J), 2 (K), or ``"auto"``: each
            :meth:`segment` call picks the axis from its prompts (:func:`~.axes.choose_axis`).
            2D images always use K.
        intensity: How voxel values are scaled to [0, 1].
        settings: Refinement and propagation behaviour.
        cache: An embedding cache to share with other sessions under one memory budget; by
            default the session has its own, of ``settings.cache_bytes``.

    Slice-level methods (``index``, boxes ``(col0, row0, col1, row1)`` and clicks ``(col, row)``
    in slice pixels) work on the slices normal to :attr:`voxel_axis`; :meth:`along` gives those
    of any axis.
    """

    def __init__(self, model: PromptableModel, image: MedicalImage, axis: str | int = "auto",
                 intensity: IntensitySettings | None = None, settings: PredictorSettings | None = None,
                 cache: EmbeddingCache | None = None) -> None:
        self.model = model
        self.image = image
        self._settings = settings or PredictorSettings()
        self.intensity = intensity or IntensitySettings()
        raw = np.asarray(image.array, dtype=np.float32)
        low, high = intensity_window(raw, self.intensity, image.modality)
        self._volume: np.ndarray | None = None
        if model.device.type == "cuda":
            # The normalised volume lives on the GPU, where embedding and tracking read it; the
            # host copy is made only if something asks for it (see ``volume``).
            self.device_volume = apply_intensity_window(torch.from_numpy(raw).to(model.device), low, high)
        else:
            self._volume = apply_intensity_window(raw, low, high)
            self.device_volume = torch.from_numpy(self._volume)  # the same memory
        store = cache if cache is not None else EmbeddingCache(self.settings.cache_bytes_for(model.device))
        self.cache = SessionCache(store, (uuid.uuid4().hex, model.cache_token))
        self.embedder = SliceEmbedder(model, self.device_volume, image.geometry.spacing, self.cache, self.settings)
        self._decoders: dict[int, SliceDecoder] = {}
        self._mirrors: dict[int, SegmentationSession] = {}
        self._axis: int | None = None
        self.set_axis(axis)

    @property
    def settings(self) -> PredictorSettings:
        """Refinement and propagation behaviour; a new value applies to the next call on every axis."""
        return self._settings

    @settings.setter
    def settings(self, value: PredictorSettings) -> None:
        self._settings = self.embedder.settings = value
        for decoder in self._decoders.values():
            decoder.settings = value

    # ------------------------------------------------------------------ axis and slices
    def set_axis(self, axis: str | int) -> None:
        """Choose the slicing direction (see the class's ``axis``); cached embeddings are kept."""
        self._axis = resolve_axis(axis, self.image.geometry)

    @property
    def auto_axis(self) -> bool:
        """Whether each :meth:`segment` call picks its axis from its prompts."""
        return self._axis is None

    @property
    def voxel_axis(self) -> int:
        """The voxel axis of the slice-level methods: the one set, K when it is ``"auto"``."""
        return 2 if self._axis is None else self._axis

    def axis_for(self, prompts: Prompts) -> int:
        """The voxel axis :meth:`segment` slices along for these prompts."""
        return choose_axis(prompts, self.image.geometry) if self._axis is None else self._axis

    def along(self, voxel_axis: int) -> SliceDecoder:
        """The slice decoder of the slices normal to ``voxel_axis`` (made once per axis)."""
        decoder = self._decoders.get(voxel_axis)
        if decoder is None:
            decoder = self._decoders[voxel_axis] = SliceDecoder(self.embedder, voxel_axis, self.settings)
        return decoder

    @property
    def transform(self) -> SliceTransform:
        """The slice <-> model-input transform of :attr:`voxel_axis`'s slices."""
        return self.embedder.transform(self.voxel_axis)

    @property
    def volume(self) -> np.ndarray:
        """The normalised ``(K, J, I)`` float32 volume in [0, 1], on the host."""
        if self._volume is None:
            self._volume = self.device_volume.cpu().numpy()
        return self._volume

    @property
    def slice_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of :attr:`voxel_axis`'s slices."""
        return self.along(self.voxel_axis).slice_shape

    @property
    def num_slices(self) -> int:
        return self.image.geometry.size[self.voxel_axis]

    def slice_image(self, index: int) -> np.ndarray:
        """Normalised 2D slice ``(rows, cols)`` at ``index``."""
        return slice_from_volume(self.volume, self.voxel_axis, index)

    def slice_tensor(self, index: int) -> torch.Tensor:
        """Normalised 2D slice ``(rows, cols)`` as a tensor on the model's device."""
        return self.embedder.slice_tensor(self.voxel_axis, index)

    # ------------------------------------------------------------------ embeddings
    def is_embedded(self, index: int) -> bool:
        return self.embedder.is_embedded(self.voxel_axis, index)

    def store_embedding(self, index: int, embedding: torch.Tensor) -> None:
        """Cache an embedding computed elsewhere for slice ``index``, e.g. by another session
        whose model shares this one's frozen image encoder."""
        self.embedder.store(self.voxel_axis, index, embedding)

    def embedding(self, index: int) -> torch.Tensor:
        """``(1, C, 64, 64)`` embedding of slice ``index``, computed on first use."""
        return self.embedder.embedding(self.voxel_axis, index)

    def embedding_along(self, voxel_axis: int, index: int) -> torch.Tensor:
        """``(1, C, 64, 64)`` embedding of slice ``index`` normal to ``voxel_axis``; thread-safe
        (a slice another thread is embedding is waited for, not computed twice)."""
        return self.embedder.embedding(voxel_axis, index)

    def embed_slices(self, indices: Sequence[int], batch_size: int = 1, progress: ProgressCallback | None = None,
                     cancel: threading.Event | None = None) -> None:
        """Embed the given slices that are not cached yet (batched: worth it on a GPU only)."""
        self.embedder.embed(self.voxel_axis, indices, batch_size, progress, cancel)

    def prefetch(self, indices: Sequence[int], progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None) -> None:
        """Embed ``indices`` ahead in batches where that pays (a GPU); a no-op on a CPU by default."""
        self.embedder.prefetch(self.voxel_axis, indices, progress, cancel)

    def mirrored(self) -> "SegmentationSession":
        """A session on this image with every slice of :attr:`voxel_axis` flipped left-right (its
        columns reversed), same model, settings and axis, sharing this session's embedding store;
        made once per axis. Its image keeps this one's geometry, so its masks are mirrored too:
        flip their columns back before use (test-time flip augmentation reads both)."""
        mirror = self._mirrors.get(self.voxel_axis)
        if mirror is None:
            image = dataclasses.replace(self.image, array=mirror_slice_columns(self.image.array, self.voxel_axis),
                                        source=f"{self.image.source} (mirrored)")
            mirror = SegmentationSession(self.model, image, self.voxel_axis, self.intensity, self.settings,
                                         cache=self.cache.store)
            self._mirrors[self.voxel_axis] = mirror
        return mirror

    # ------------------------------------------------------------------ one slice
    def predict_slice(self, index: int, box: Box2D | None = None, positives: Sequence[Sequence[float]] = (),
                      negatives: Sequence[Sequence[float]] = ()) -> np.ndarray:
        """Segment one slice from a user's box and/or clicks: ``(rows, cols)`` bool mask
        (:meth:`SliceDecoder.predict`)."""
        return self.along(self.voxel_axis).predict(index, box, positives, negatives)

    def decode_slice(self, index: int, box: Box2D | None = None, positives: Sequence = (), negatives: Sequence = ()
                     ) -> np.ndarray:
        """One decoder call with exactly this box and clicks, or none (:meth:`SliceDecoder.decode`)."""
        return self.along(self.voxel_axis).decode(index, box, positives, negatives)

    def decode_logits(self, index: int, box: Box2D) -> np.ndarray:
        """``(rows, cols)`` float32 logits of one decoder call with exactly this box."""
        return self.along(self.voxel_axis).decode_logits(index, box)

    def prompt_free_logits(self, index: int) -> np.ndarray:
        """``(rows, cols)`` float32 logits of one decoder call with no prompt."""
        return self.along(self.voxel_axis).prompt_free_logits(index)

    def decode_best_box(self, index: int, boxes: Sequence[Box2D], automatic: bool = False) -> tuple[np.ndarray, int]:
        """One decoder call with candidate boxes; the predicted IoU picks ``(mask, position)``
        (``automatic``: automatic mode's re-prompt, see :meth:`.SliceDecoder.decode`)."""
        return self.along(self.voxel_axis).decode_best_box(index, boxes, automatic)

    def box_margin(self, input_px: float | None = None) -> tuple[float, float]:
        """Box margin ``(col, row)`` in slice pixels for ``input_px`` model-input pixels."""
        return self.along(self.voxel_axis).box_margin(input_px)

    def decoder_step(self):
        """The propagation :class:`~MedFMSegmentLib.decoder_step.DecoderStep` of :attr:`voxel_axis`."""
        return self.along(self.voxel_axis).step()

    def uses_consensus(self, box: Sequence[float]) -> bool:
        """Whether the settings' 3D box strategy means consensus for this voxel ``box``."""
        return self.settings.uses_consensus(box)

    def propagate_box_logits(self, box: Sequence[float], voxel_axis: int,
                             cancel: threading.Event | None = None) -> np.ndarray:
        """The ``propagate`` strategy's ``(K, J, I)`` logits for a 3D ``box`` along ``voxel_axis``."""
        return propagate_box_logits(self.along(voxel_axis), box, self.image.geometry.shape, cancel)

    # ------------------------------------------------------------------ 3D
    def segment(self, prompts: Prompts, propagate: bool | None = None, progress: ProgressCallback | None = None,
                cancel: threading.Event | None = None, on_update: UpdateCallback | None = None) -> np.ndarray:
        """Segment from voxel prompts; the result is a ``(K, J, I)`` boolean mask.

        * A box flat along the slicing axis, or clicks on one slice, segment that slice.
        * A box spanning several slices segments its middle slice, then propagates slice by slice
          within the box's range, each slice prompted with its neighbour's mask box.
        * ``propagate=True`` with a one-slice prompt propagates until the structure ends.
        * Clicks on several slices (no box) segment each clicked slice.
        * A box alone spanning several slices on every axis, with the axis left on ``"auto"`` and
          the settings' strategy meaning consensus or sparse for it: :mod:`.consensus`, :mod:`.sparse`.

        Args:
            prompts: Box and clicks in voxel indices (i, j, k).
            propagate: Force propagation on or off; None decides from the box.
            progress: Called with (slices done, slices planned) as slices are finished.
            cancel: Set it to stop; raises :class:`~MedFMSegmentLib.errors.CancelledError`.
            on_update: Called with ``(voxel_axis, index, plane)`` each time a slice of the result
                is written: the prompted slice first, then the others as they come (later rounds
                again for slices they change). Applied in order to an empty volume, the updates
                give the returned mask.
        """
        prompts.validate(self.image.geometry)
        if prompts.is_empty:
            raise InputError("at least one prompt is needed: a box or a positive click")
        geometry = self.image.geometry
        # Consensus picks its own axes: only when the axis is left to the session (not fixed by the
        # user or by an adapter trained on one orientation), for a box alone.
        if (self.auto_axis and prompts.box is not None and propagate is not False and not prompts.positives
                and not prompts.negatives and all(prompts.box[a + 3] > prompts.box[a] for a in range(3))
                and self.settings.strategy_for(prompts.box) in ("consensus", "sparse")):
            run = segment_box_consensus if self.settings.uses_consensus(prompts.box) else segment_box_sparse
            return run(self.along, prompts.box, geometry.shape, geometry.spacing, self.settings, progress, cancel,
                       on_update)
        decoder = self.along(self.axis_for(prompts))
        return _segment_on_axis(decoder, prompts, geometry.shape, propagate, progress, cancel, on_update)


def _segment_on_axis(decoder: SliceDecoder, prompts: Prompts, shape: tuple[int, int, int], propagate_: bool | None,
                     progress: ProgressCallback | None, cancel: threading.Event | None,
                     on_update: UpdateCallback | None) -> np.ndarray:
    """:meth:`SegmentationSession.segment` along the decoder's axis (no consensus)."""
    axis = decoder.voxel_axis
    result = np.zeros(shape, dtype=bool)
    slice_pts = {"pos": [to_slice_coords(p, axis) for p in prompts.positives],
                 "neg": [to_slice_coords(p, axis) for p in prompts.negatives]}

    def clicks_on(index: int, kind: str) -> list[tuple[float, float]]:
        return [(c, r) for c, r, s in slice_pts[kind] if int(round(s)) == index]

    def write(index: int, plane: np.ndarray) -> None:
        slice_into_volume(result, axis, index, plane)
        if on_update is not None:
            on_update(axis, index, np.array(plane, dtype=bool))

    def predict(index: int, box: Box2D | None) -> np.ndarray:
        return decoder.predict(index, box, clicks_on(index, "pos"), clicks_on(index, "neg"))

    def each(indices: Sequence[int], box: Box2D | None) -> None:
        for n, index in enumerate(indices):
            check_cancel(cancel)
            write(index, predict(index, box))
            if progress:
                progress(n + 1, len(indices))

    everything = (0, decoder.num_slices - 1)
    if prompts.box is not None:
        box2d, first, last = box_on_axis(prompts.box, axis)
        if propagate_ is None:
            propagate_ = last > first
        if not propagate_:
            planned = range(first, last + 1)
            decoder.prefetch(planned, cancel=cancel)
            each(planned, box2d)
            return result
        limits = (first, last) if last > first else everything
        decoder.prefetch(range(limits[0], limits[1] + 1), cancel=cancel)
        start = (first + last) // 2
        start_mask = predict(start, box2d)
        write(start, start_mask)
        propagate(decoder, result, start, start_mask, limits, box2d if last > first else None, clicks_on, progress,
                  cancel, on_update=on_update)
        return result
    clicked = sorted({int(round(s)) for _, _, s in slice_pts["pos"]})
    each(clicked, None)
    if propagate_ and len(clicked) == 1:
        start = clicked[0]
        propagate(decoder, result, start, slice_from_volume(result, axis, start), everything, None, clicks_on,
                  progress, cancel, on_update=on_update)
    return result
