"""Which mask decoder an adapter's box prompts use: the adapted one, or the base model's own.

Fine-tuning trains the decoder for both prompt-free and box-prompted decoding. With few cases it
can get worse with boxes than the base model was (on one HC18 image, box Dice 0.707 against
0.911 zero-shot: ``bench/results/learning_curves.json``). So a frozen-encoder adapter keeps the
adapted decoder for boxes only where its validation slices showed it at least as good with boxes
as the base model; otherwise (worse, or no validation slices at all) a user's box and click
prompts run the base model's decoder on the base embedding, as the base model does in PyTorch, and
automatic mode (its prompt-free pass and the box it re-prompts with) runs the adapted one, which
was trained for exactly that. LoRA adapters change the embeddings themselves, so they always use
their own decoder.
"""

from __future__ import annotations

import copy

from torch import nn

__all__ = ["BOX_PROMPTS", "base_decoder_copy", "choose_box_prompts", "use_base_prompt_decoder"]

#: Values of an adapter's ``box_prompts`` metadata; adapters without it are ``"adapted"``.
BOX_PROMPTS = ("adapted", "base")
_PREFIX = "mask_decoder."


def choose_box_prompts(encoder_mode: str, base: dict | None, adapted: dict | None) -> str:
    """``"adapted"`` or ``"base"``, from the validation figures of the base and adapted model
    (:func:`.comparison.evaluate`: ``{"box", "automatic", "dice"}``, None without validation)."""
    if encoder_mode != "frozen":
        return "adapted"
    base_box, adapted_box = (base or {}).get("box"), (adapted or {}).get("box")
    if base_box is None or adapted_box is None:
        return "base"
    return "adapted" if adapted_box >= base_box else "base"


def base_decoder_copy(model: nn.Module, base_state: dict | None = None) -> nn.Module:
    """A frozen copy of the model's mask decoder, with the base model's weights from
    ``base_state`` (trained-parameter names, as :func:`.adapters.trainable_state` gives them)
    where the model holds another adapter's (continuing a parent)."""
    decoder = copy.deepcopy(model.mask_decoder)
    if base_state:
        decoder.load_state_dict({k[len(_PREFIX):]: v for k, v in base_state.items() if k.startswith(_PREFIX)},
                                strict=False)
    return decoder.requires_grad_(False).eval()


def use_base_prompt_decoder(model: nn.Module, decoder: nn.Module) -> None:
    """Prompted decoding of ``model`` runs ``decoder`` on the raw embedding from now on
    (:attr:`~MedFMSegmentLib.models.PromptableModel.prompt_decoder`)."""
    model.prompt_decoder = decoder.to(next(model.parameters()).device)
