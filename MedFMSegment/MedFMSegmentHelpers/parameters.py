"""The module's parameter node (saved with the scene)."""

from pathlib import Path
from typing import Annotated

from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

__all__ = ["MedFMSegmentParameterNode"]


@parameterNodeWrapper
class MedFMSegmentParameterNode:
    """The module's state, saved with the scene (the remote token is not saved).

    checkpointPath - weights of SAM / MedSAM; adapterFolder - the local service's adapter folder;
    adapterName - the adapter prompts, automatic segmentation and batch use ("" : none);
    newAdapterName - the adapter fine-tuning writes.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    roiNode: vtkMRMLMarkupsROINode
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    serviceMode: Annotated[str, Choice(["local", "remote"])] = "local"
    serviceUrl: str = ""
    axis: Annotated[str, Choice(["auto", "axial", "coronal", "sagittal"])] = "auto"
    box3dStrategy: Annotated[str, Choice(["auto", "propagate", "consensus", "sparse"])] = "auto"
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    modelName: str = "litemedsam"
    checkpointPath: Path
    adapterFolder: Path
    adapterName: str = ""
    newAdapterName: str = "my-structure"
    steps: Annotated[int, WithinRange(0, 100000)] = 0
    rank: Annotated[int, WithinRange(1, 64)] = 4
