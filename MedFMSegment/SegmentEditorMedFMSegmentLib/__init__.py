"""The Segment Editor effect "MedFMSegment" (registered by the MedFMSegment module at startup)."""

from .SegmentEditorEffect import SegmentEditorEffect  # noqa: F401

__all__ = ["SegmentEditorEffect"]
