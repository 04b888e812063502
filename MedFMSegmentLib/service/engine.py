"""The inference names the service uses, from wherever this tree keeps them.

The inference code is moving from ``predictor.py``, ``background.py`` and
``finetune/automatic.py`` into the ``MedFMSegmentLib.inference`` package (``box_on_axis`` into
``geometry.py``, ``load_model`` into ``loading.py``); importing through this one module keeps the
service working on either layout (the fallback goes once the move is merged).
"""

from __future__ import annotations

try:
    from ..geometry import box_on_axis
    from ..inference import (BOX3D_STRATEGIES, EmbeddingCache, PredictorSettings, SegmentationSession,
                             choose_axis, segment_automatic)
    from ..inference.prefetch import nearest_first
    from ..loading import load_model
except ImportError as exc:  # the layout before the inference package
    if not any(name in str(exc) for name in ("inference", "box_on_axis", "loading")):
        raise
    from ..models import load_model
    from ..background import nearest_first
    from ..finetune.automatic import segment_automatic
    from ..predictor import (BOX3D_STRATEGIES, EmbeddingCache, PredictorSettings, SegmentationSession, box_on_axis,
                             choose_axis)

__all__ = ["BOX3D_STRATEGIES", "EmbeddingCache", "PredictorSettings", "SegmentationSession", "box_on_axis",
           "choose_axis", "load_model", "nearest_first", "segment_automatic"]
