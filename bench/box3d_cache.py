"""Slice embeddings of the hippocampus boxes, computed once and kept on disk (not a suite).

:func:`cached_session` gives a session whose cache already holds every slice of the 3D box along
each axis, read from ``$MEDFMSEGMENT_BENCH_CACHE`` (default ``/tmp/medfmsegment_box3d``), and
counts the distinct slices a strategy asks for, so that strategies can be compared by decoding
only, with their encoder cost counted rather than paid.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from MedFMSegmentLib.geometry import box_on_axis
from MedFMSegmentLib.inference import PredictorSettings, SegmentationSession

__all__ = ["CACHE_DIR", "cache_path", "cached_session", "embed_box_slices", "save_embeddings"]

CACHE_DIR = Path(os.environ.get("MEDFMSEGMENT_BENCH_CACHE", "/tmp/medfmsegment_box3d"))


def cache_path(model, name: str, axis: int, kind: str = "") -> Path:
    """Where case ``name``'s embeddings along ``axis`` are kept; ``kind`` tells other ways of
    computing them (e.g. ``"mosaic2"``) apart from whole slices encoded one by one."""
    tag = f"{model.backend}-{getattr(model.accelerator, 'precision', 'f32')}" + (f"-{kind}" if kind else "")
    return CACHE_DIR / tag / f"{name}.axis{axis}.pt"


def save_embeddings(path: Path, store: dict) -> None:
    """Write ``{slice index: embedding}`` to ``path`` as bfloat16, whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({index: embedding.to(torch.bfloat16) for index, embedding in store.items()}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)


def embed_box_slices(model, name: str, image, box) -> list[float]:
    """Embed (or find on disk) every slice of ``box`` along each axis; returns the seconds of the
    slices embedded now, one per slice."""
    seconds: list[float] = []
    session = SegmentationSession(model, image)
    for axis in (0, 1, 2):
        path = cache_path(model, name, axis)
        if path.is_file():
            continue
        _, first, last = box_on_axis(box, axis)
        store = {}
        for index in range(first, last + 1):
            start = time.perf_counter()
            embedding = session.embedding_along(axis, index)
            seconds.append(time.perf_counter() - start)
            store[index] = embedding
        session.cache.clear()
        save_embeddings(path, store)
    return seconds


def cached_session(model, name: str, image, settings: PredictorSettings | None = None) -> SegmentationSession:
    """A session with the box slices' embeddings already stored; ``session.used`` collects the
    ``(axis, index)`` of every slice a strategy asked for (what it would have embedded)."""
    session = SegmentationSession(model, image, settings=settings)
    for axis in (0, 1, 2):
        for index, embedding in torch.load(cache_path(model, name, axis)).items():
            session.embedder.store(axis, index, embedding.float())
    used: set = set()
    embedder = session.embedder
    original = embedder.embedding

    def counting(axis: int, index: int):
        used.add((axis, int(index)))
        return original(axis, index)

    embedder.embedding = counting
    session.used = used
    return session


def main_cache(count: int = 20, offset: int = 0) -> None:
    """Fill the cache for the suite's cases (printing the mean seconds per slice)."""
    from MedFMSegmentLib.loading import load_model
    from .data import bbox3d, hippocampus_case, hippocampus_names

    model = load_model("litemedsam")
    print("model", model.backend, getattr(model.accelerator, "precision", "f32"), flush=True)
    for name in hippocampus_names(count, offset):
        image, truth = hippocampus_case(name)
        seconds = embed_box_slices(model, name, image, bbox3d(truth))
        import resource
        print(name, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, len(seconds), f"{np.mean(seconds) if seconds else 0:.3f}", os.getloadavg(), flush=True)


if __name__ == "__main__":
    main_cache()
