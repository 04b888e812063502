"""Prompted and automatic inference on one image: the session and the parts it is made of.

* :mod:`.session`: :class:`SegmentationSession`, the facade (set the image, then segment).
* :mod:`.embeddings`: the embedding store (:class:`EmbeddingCache`, per-session views, batching).
* :mod:`.slices`: one slice from a box or clicks (:class:`~.slices.SliceDecoder`).
* :mod:`.propagate`, :mod:`.consensus`: the 3D box strategies, each along explicit axes.
* :mod:`.tracking`: in-plane motion between neighbouring slices.
* :mod:`.automatic`: prompt-free segmentation with an adapter trained for it.
* :mod:`.prefetch`: embedding the slice a viewer shows before it is prompted.
* :mod:`.axes`, :mod:`.settings`: axis choice, settings, registries and callback types.
"""

from .automatic import segment_automatic
from .axes import choose_axis, resolve_axis
from .embeddings import EmbeddingCache, SessionCache
from .prefetch import BackgroundEmbedder
from .session import SegmentationSession
from .settings import AXES, BOX3D_STRATEGIES, NOT_SEGMENTED_LOGIT, PredictorSettings

__all__ = ["AXES", "BOX3D_STRATEGIES", "NOT_SEGMENTED_LOGIT", "BackgroundEmbedder", "EmbeddingCache",
           "PredictorSettings", "SegmentationSession", "SessionCache", "choose_axis", "resolve_axis",
           "segment_automatic"]
