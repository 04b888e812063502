"""Prompt-free segmentation with an adapter trained for it."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import CancelledError
from ..geometry import slice_into_volume


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


@torch.inference_mode()
def segment_automatic(session, keep: str = "largest", progress=None, cancel=None) -> np.ndarray:
    """Embed every slice, decode with an empty prompt, threshold, keep the largest 3D component."""
    model = session.model
    result = np.zeros(session.image.array.shape, dtype=bool)
    n = session.num_slices
    for index in range(n):
        if cancel is not None and cancel.is_set():
            raise CancelledError("automatic segmentation cancelled")
        embedding = session.embedding(index)
        logits, _ = model.decode(embedding, boxes=None, points=None)
        plane = (session.transform.logits_to_slice(logits)[0] > 0).cpu().numpy()
        slice_into_volume(result, session.voxel_axis, index, plane)
        if progress is not None:
            progress(index + 1, n)
    if keep == "largest" and result.any():
        result = keep_largest_component(result)
    return result
