"""The inference service (``medfmsegment serve``) and its client.

One process keeps the models, adapters, uploaded volumes and one bounded embedding cache, and
serves prompts, focus (look-ahead embedding), jobs (3D prompts, automatic segmentation,
fine-tuning) and adapters over HTTP with a bearer token. :mod:`.client` is the plain-Python
client the CLI, scripts and the Slicer module use; it needs numpy only. Importing this package
loads the client alone (the server's FastAPI modules load with ``serve``).
"""

from .client import JobStatus, PromptReply, ServiceClient, ServiceError

__all__ = ["ServiceClient", "ServiceError", "PromptReply", "JobStatus"]
