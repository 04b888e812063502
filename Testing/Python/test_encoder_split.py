"""The image encoder cut into a cached head and a trainable tail (partial fine-tuning)."""
import pytest
import torch

from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.finetune.adapters import inject_lora
from MedFMSegmentLib.finetune.encoder_split import check_first_stage, encode_head, encode_tail, stage_prefix
from MedFMSegmentLib.models import tiny_random_model_for_tests


def _reassembled(encoder, images, first):
    with torch.no_grad():
        return encode_tail(encoder, encode_head(encoder, images, first), first), encoder(images)


def test_tiny_vit_head_and_tail_give_the_whole_encoder():
    model = tiny_random_model_for_tests()
    assert stage_prefix(model.image_encoder) == "blocks"
    got, expected = _reassembled(model.image_encoder, model.normalize(torch.rand(2, 3, 64, 64)), 0)
    assert got.shape == expected.shape == (2, 32, 4, 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("first", [1, 3])
def test_real_litemedsam_head_and_tail_give_the_whole_encoder(litemedsam, first):
    encoder = litemedsam.image_encoder  # the PyTorch module, whatever backend the model runs on
    assert stage_prefix(encoder) == "layers"
    images = litemedsam.normalize(torch.rand(1, 3, 256, 256))
    got, expected = _reassembled(encoder, images, first)
    assert got.shape == (1, 256, 64, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_first_stage_out_of_range_is_refused():
    encoder = tiny_random_model_for_tests().image_encoder  # one block
    check_first_stage(encoder, 0)
    with pytest.raises(InputError, match="between 0 and 0"):
        check_first_stage(encoder, 1)


def test_lora_stages_select_the_vit_blocks_by_index():
    model = tiny_random_model_for_tests()
    assert inject_lora(model, 2, 4.0, ("qkv", "proj"), (0,)) == ["blocks.0.attn.qkv", "blocks.0.attn.proj"]
    with pytest.raises(InputError, match="no LoRA target"):
        inject_lora(tiny_random_model_for_tests(), 2, 4.0, ("qkv", "proj"), (1,))
