"""Few-shot LoRA adaptation of LiteMedSAM: training, portable adapters, automatic segmentation."""
from .adapters import AdapterInfo, load_adapted_model, save_adapter

__all__ = ["AdapterInfo", "load_adapted_model", "save_adapter"]
