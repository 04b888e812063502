"""Adapter surgery: LoRA in the image encoder, the embedding adapter, and loading an adapter.

The files themselves (reading, checking, crash-safe writing) are :mod:`.adapter_format`'s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import loading
from ..errors import InputError
from ..models import PromptableModel
from ..preprocessing import IntensitySettings
from .adapter_format import (METADATA_DEFAULTS, METADATA_FILE, WEIGHTS_FILE, model_identity, read_metadata,
                             read_weights, write_adapter)
from .automatic_choice import NET_PREFIX
from .box_prompts import base_decoder_copy, use_base_prompt_decoder

__all__ = ["AdapterInfo", "EmbeddingAdapter", "add_embedding_adapter", "inject_lora", "is_trained",
           "trainable_state", "save_adapter", "apply_adapter", "load_trained_state", "check_base",
           "load_adapted_model", "read_metadata", "WEIGHTS_FILE", "METADATA_FILE"]


@dataclass
class AdapterInfo:
    intensity: IntensitySettings
    label_name: str
    label_value: int | None
    automatic: bool
    keep_components: str
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, metadata: dict) -> "AdapterInfo":
        return cls(IntensitySettings.from_dict(metadata.get("intensity", {})),
                   metadata.get("label_name", METADATA_DEFAULTS["label_name"]), metadata.get("label_value"),
                   bool(metadata.get("automatic", False)),
                   metadata.get("keep_components", METADATA_DEFAULTS["keep_components"]), metadata)

    @property
    def axis(self) -> str:
        """The slice orientation the adapter was trained on (it has seen slices of that one only)."""
        return self.metadata.get("axis", METADATA_DEFAULTS["axis"])


class EmbeddingAdapter(torch.nn.Module):
    """A residual bottleneck on the ``(B, C, 64, 64)`` image embedding, before the decoder.

    With the image encoder frozen (fine-tuning on a CPU, on cached embeddings) the decoder alone
    cannot change what the embedding says about the target structure; this small block (1x1 down
    to ``channels``, 3x3, 1x1 back up, added to its input) can, at the cost of a decoder step.
    The last layer starts at zero, so training starts from the base model's output.
    """

    def __init__(self, embedding_channels: int = 256, channels: int = 64, prompt_free_only: bool = False) -> None:
        super().__init__()
        #: Applied to prompt-free decoding only (automatic mode); prompted calls see the raw embedding.
        self.prompt_free_only = prompt_free_only
        self.down = torch.nn.Conv2d(embedding_channels, channels, 1)
        self.mix = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.up = torch.nn.Conv2d(channels, embedding_channels, 1)
        self.act = torch.nn.GELU()
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return embedding + self.up(self.act(self.mix(self.act(self.down(embedding)))))


def add_embedding_adapter(model: PromptableModel, channels: int, prompt_free_only: bool = False) -> None:
    """Give ``model`` an :class:`EmbeddingAdapter` of ``channels`` (on the model's device)."""
    model.embedding_adapter = EmbeddingAdapter(model.prompt_encoder.embed_dim, channels,
                                               prompt_free_only).to(model.device)


def inject_lora(model: PromptableModel, rank: int, alpha: float, targets=("qkv", "proj"),
                encoder_stages=None) -> list[str]:
    """Add LoRA layers (peft) to the image encoder's attention Linear layers, in place.

    ``encoder_stages``: indices of TinyViT ``layers`` (or ViT ``blocks``) to adapt; None: all.
    """
    from peft import LoraConfig, inject_adapter_in_model

    from .encoder_split import stage_prefix

    prefix = stage_prefix(model.image_encoder) if encoder_stages is not None else ""
    names = []
    for name, module in model.image_encoder.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, torch.nn.Linear) and "attn" in name:
            if encoder_stages is None or any(name.startswith(f"{prefix}.{s}.") for s in encoder_stages):
                names.append(name)
    if not names:
        raise InputError("no LoRA target layers found in the image encoder")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0)
    model.image_encoder = inject_adapter_in_model(config, model.image_encoder)
    return names


def is_trained(parameter_name: str) -> bool:
    """Whether fine-tuning trains (and an adapter file stores) this parameter of the model."""
    return ("lora_" in parameter_name or parameter_name.startswith("mask_decoder.")
            or parameter_name.startswith("embedding_adapter.") or parameter_name.startswith(NET_PREFIX))


def trainable_state(model: PromptableModel) -> dict:
    """LoRA weights of the encoder, the embedding adapter's, all mask decoder weights and automatic
    mode's U-Net when it has one: a copy
    (on a CPU ``.cpu()`` alone would alias the live weights, and a kept best state would follow
    training)."""
    state = {}
    for key, value in model.state_dict().items():
        if is_trained(key):
            state[key] = value.detach().to("cpu", copy=True).contiguous()
    return state


def save_adapter(model: PromptableModel, folder: str | os.PathLike, metadata: dict) -> Path:
    """Write the model's trained weights and ``metadata`` as an adapter folder, crash-safe
    (see :func:`.adapter_format.write_adapter`)."""
    return write_adapter(folder, trainable_state(model), metadata)


def apply_adapter(model: PromptableModel, adapter_dir: str | os.PathLike, metadata: dict,
                  state: dict | None = None) -> PromptableModel:
    """Add the adapter's LoRA layers and embedding adapter to ``model`` and load its weights
    (``state``: already read with :func:`.adapter_format.read_weights`)."""
    if state is None:
        state = read_weights(adapter_dir, metadata)
    lora = metadata.get("lora", {})
    if lora is not None:  # None: a decoder-only adapter (frozen image encoder)
        inject_lora(model, int(lora.get("rank", 4)), float(lora.get("alpha", 8)),
                    tuple(lora.get("targets", ("qkv", "proj"))), lora.get("encoder_stages"))
    embedding_adapter = metadata.get("embedding_adapter")
    if embedding_adapter:
        add_embedding_adapter(model, int(embedding_adapter["channels"]),
                              bool(embedding_adapter.get("prompt_free_only", False)))
    if metadata.get("box_prompts") == "base":  # the base decoder, before the adapter's weights replace it
        use_base_prompt_decoder(model, base_decoder_copy(model))
    if metadata.get("automatic_net"):  # automatic mode's U-Net (see .automatic_choice)
        from .baseline import SegmentationNet

        model.automatic_net = SegmentationNet.from_settings(metadata["automatic_net"]).to(model.device)
    load_trained_state(model, state, f"adapter {adapter_dir}")
    return model.eval()


def load_trained_state(model: PromptableModel, state: dict, where: str) -> None:
    """Load adapter weights into a model prepared for them; a mismatch is one :class:`InputError`."""
    device = model.device
    try:
        missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "")
        raise InputError(f"{where}: its weights do not fit its metadata.json ({detail or 'shape mismatch'})") from None
    missing = [key for key in missing if is_trained(key)]
    if missing or unexpected:
        # strict=False alone would drop unknown weights or keep untrained ones without a word
        raise InputError(f"{where}: its weights do not match its metadata.json "
                         f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing + unexpected)[0]})")


def check_base(metadata: dict, model: PromptableModel, where: str) -> None:
    """Refuse an adapter trained on another base model than ``model``."""
    base = metadata.get("base_model", {})
    sha = model_identity(model)
    if base.get("name") != model.spec.name or base.get("sha256") != sha:
        raise InputError(f"{where} was trained on base model {base.get('name')} "
                         f"(SHA-256 {str(base.get('sha256'))[:12]}...) but the loaded model is {model.spec.name} "
                         f"(SHA-256 {sha[:12]}...)")


def load_adapted_model(adapter_dir: str | os.PathLike, model_name: str = "litemedsam", checkpoint=None,
                       device="auto", backend: str | None = None, precision: str | None = None,
                       base_model: PromptableModel | None = None):
    """Load the base model and apply an adapter: ``(PromptableModel, AdapterInfo)``.

    ``backend``: ``auto`` (the default) converts nothing new: an adapter that left the image
    encoder as it was (a frozen-encoder adapter) runs the encoder on the base model's accelerated
    graph, already converted and cached, and its own decoder in PyTorch; a LoRA adapter, whose
    encoder would need its own conversion (about a minute on a small CPU), stays on PyTorch.
    ``openvino`` converts the adapted weights (keyed by their own digest, so never confused with
    the base). ``precision`` is OpenVINO's (see :func:`MedFMSegmentLib.loading.load_model`).
    ``base_model``: an already built base model to adapt in place instead of loading ``model_name``.
    """
    from ..backends import accelerate, check_backend, resolve_backend, weights_digest

    backend = check_backend(backend, precision)  # an unknown name fails before anything is loaded
    metadata = read_metadata(adapter_dir)
    state = read_weights(adapter_dir, metadata)  # damaged weights fail before any model is loaded
    # PyTorch first: the adapter changes the weights, so any conversion must come after it.
    model = base_model if base_model is not None else loading.load_model(model_name, checkpoint, device,
                                                                         backend="torch")
    check_base(metadata, model, f"adapter {adapter_dir}")
    base_encoder = None
    if backend == "auto" and resolve_backend("auto", model) == "openvino":
        base_encoder = weights_digest(model.image_encoder)
    apply_adapter(model, adapter_dir, metadata, state)
    if backend == "openvino":
        accelerate(model, backend, precision)
    elif base_encoder is not None and weights_digest(model.image_encoder) == base_encoder:
        # The training embeddings came from this same accelerated encoder (see trainer._load_base).
        accelerate(model, "auto", precision, parts=("encoder",))
    return model, AdapterInfo.from_metadata(metadata)
