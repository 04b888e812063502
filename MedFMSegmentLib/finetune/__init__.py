"""Few-shot adaptation of LiteMedSAM: training, continuing, portable adapters, a MONAI baseline."""
from .adapters import AdapterInfo, load_adapted_model, save_adapter
from .continual import continue_adapter, update_adapter

__all__ = ["AdapterInfo", "load_adapted_model", "save_adapter", "continue_adapter", "update_adapter"]
