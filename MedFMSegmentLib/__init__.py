"""MedFMSegmentLib: promptable and few-shot adapted SAM-family segmentation of medical images.

The library runs without 3D Slicer; only :mod:`MedFMSegmentLib.slicer_bridge` imports ``slicer``.
Heavy imports (torch, SimpleITK) happen in the submodules, so ``import MedFMSegmentLib`` is cheap.
"""

__version__ = "0.1.0"
