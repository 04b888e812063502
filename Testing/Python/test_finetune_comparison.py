"""Base model and adapted Dice side by side on the validation slices (plumbing, tiny random model).

Each figure the trainer stores is recomputed here from scratch: a freshly built base model (or
the saved adapter, reloaded), the recorded validation slices, the tight label box and no prompt,
MedFMSegmentLib.metrics.dice; nothing of the trainer's evaluation code is reused.
"""
import numpy as np
import torch
import torch.nn.functional as F

from MedFMSegmentLib.cli import main
from MedFMSegmentLib.finetune.adapter_format import read_metadata
from MedFMSegmentLib.finetune.adapters import load_adapted_model, save_adapter
from MedFMSegmentLib.finetune.continual import continue_adapter
from MedFMSegmentLib.finetune.trainer import FinetuneConfig, finetune
from MedFMSegmentLib.geometry import in_plane_axes, slice_from_volume
from MedFMSegmentLib.metrics import dice
from MedFMSegmentLib.models import tiny_random_model_for_tests
from MedFMSegmentLib.preprocessing import IntensitySettings, SliceTransform, normalize_intensity
from test_finetune import TINY, _synthetic_case, tiny_model_by_name  # noqa: F401 (fixture)
from test_reliability_finetune import _finetune_args, case_files, trained  # noqa: F401 (fixtures)


def independent_figures(model, cases, slices, automatic=True):
    """Mean of tight-box Dice (slices with the structure) and prompt-free Dice (all slices)."""
    box, auto = [], []
    for case, axis, index in slices:
        image, label = cases[case]
        volume = normalize_intensity(image.array, IntensitySettings(), image.modality)
        picture = slice_from_volume(volume, axis, index)
        truth = slice_from_volume(label.array != 0, axis, index)
        rows, cols = in_plane_axes(axis)
        spacing = image.geometry.spacing
        t = SliceTransform.create(picture.shape[0], picture.shape[1], model.image_size, (spacing[rows], spacing[cols]))
        target = t.mask_to_input(truth) > 0
        with torch.no_grad():
            embedding = model.encode(t.image_to_input(picture)[None])
            prompts = ([True] if truth.any() else []) + ([False] if automatic else [])
            for with_box in prompts:
                boxes = None
                if with_box:
                    ys, xs = np.nonzero(target.numpy())
                    boxes = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=torch.float32)
                logits, _ = model.decode(embedding, boxes=boxes)
                logits = F.interpolate(logits.float(), size=target.shape, mode="bilinear", align_corners=False)
                pred = (logits[0, 0] > 0)[:t.new_rows, :t.new_cols].numpy()
                score = dice(pred, target[:t.new_rows, :t.new_cols].numpy())
                (box if with_box else auto).append(score)
    return float(np.mean([np.mean(part) for part in (box, auto) if part]))


def test_tiny_run_stores_base_and_adapted_dice_equal_to_independent_evaluations(tmp_path):
    cases = [_synthetic_case(0), _synthetic_case(1)]
    reports = []
    config = FinetuneConfig(model_name=TINY, steps=6, validate_every=3, device="cpu", embedding_budget=10)
    model, metadata = finetune(cases, config, progress=reports.append)
    comparison = metadata["validation_comparison"]
    slices = comparison["slices"]
    assert slices and len(slices) == metadata["validation_slices"]
    assert all(0 <= c < 2 and a == 2 and 0 <= i < 6 for c, a, i in slices)
    base, adapted = metadata["base_validation_dice"], metadata["adapted_validation_dice"]
    assert 0 <= base <= 1 and 0 <= adapted <= 1
    assert comparison["base"]["dice"] == base and comparison["adapted"]["dice"] == adapted
    assert set(comparison["base"]) == {"dice", "box", "automatic"} and "parent" not in comparison
    # the base figure: a base model that never saw an adapter, on the same slices and prompts
    assert abs(independent_figures(tiny_random_model_for_tests(), cases, slices) - base) < 1e-9
    # the adapted figure: the adapter as saved and reloaded
    reloaded, _ = load_adapted_model(save_adapter(model, tmp_path / "a", metadata), model_name=TINY)
    assert abs(independent_figures(reloaded, cases, slices) - adapted) < 1e-9
    assert read_metadata(tmp_path / "a")["base_validation_dice"] == base
    steps = [r for r in reports if "step" in r]
    assert steps and all(r["base_val_dice"] == base for r in steps)


def test_tiny_run_without_validation_slices_has_no_figures():
    image, label = _synthetic_case(0)
    label.array[:] = 0
    label.array[2, 10:20, 10:20] = 1  # one slice with the structure: too few to hold some out
    _, metadata = finetune([(image, label)], FinetuneConfig(model_name=TINY, steps=2, device="cpu",
                                                            embedding_budget=4))
    assert metadata["base_validation_dice"] is None and metadata["adapted_validation_dice"] is None
    assert metadata["validation_comparison"]["slices"] == []
    from MedFMSegmentLib.finetune.comparison import summary_line

    assert "nothing checked the adapter" in summary_line(metadata) and "3 or more cases" in summary_line(metadata)


def test_continuing_compares_with_the_base_model_not_the_parent(trained):  # noqa: F811
    new = [_synthetic_case(2)]
    _, metadata = continue_adapter(trained, new, replay=False, base_model=tiny_random_model_for_tests(),
                                   device="cpu", steps=2, embedding_budget=8)
    comparison = metadata["validation_comparison"]
    assert set(comparison) >= {"base", "adapted", "parent"} and comparison["slices"]
    base = independent_figures(tiny_random_model_for_tests(), new, comparison["slices"])
    assert abs(metadata["base_validation_dice"] - base) < 1e-9
    parent, _ = load_adapted_model(trained, model_name=TINY)
    assert abs(comparison["parent"]["dice"] - independent_figures(parent, new, comparison["slices"])) < 1e-9


def test_cli_final_line_shows_adapted_and_base_dice(tmp_path, case_files, capsys):  # noqa: F811
    out = tmp_path / "adapter"
    assert main(_finetune_args(case_files, out)) == 0, capsys.readouterr().err
    line = capsys.readouterr().out.strip().splitlines()[-1]
    meta = read_metadata(out)
    assert line.startswith(f"adapter written to {out} (validation Dice ")
    assert (f"{meta['adapted_validation_dice']:.3f} adapted, {meta['base_validation_dice']:.3f} base model "
            f"({len(meta['validation_comparison']['slices'])} slices)") in line


def test_the_kept_best_state_is_a_copy_not_the_live_weights():
    """The trainer keeps the best step's weights with ``trainable_state``; on a CPU a state that
    aliased the parameters would follow training, and the adapter saved would be the last step's."""
    from MedFMSegmentLib.finetune.adapters import trainable_state
    from MedFMSegmentLib.models import tiny_random_model_for_tests

    model = tiny_random_model_for_tests()
    state = trainable_state(model)
    assert state, "the decoder's weights are trained"
    before = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for parameter in model.mask_decoder.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(state[k], before[k]) for k in state), "the snapshot changed with the model"


def test_without_validation_box_prompts_keep_the_base_decoder_as_saved_and_reloaded(tmp_path):
    """Nothing validated the adapted decoder with boxes, so a user's box prompts decode exactly as
    the base model does; prompt-free decoding and automatic mode's re-prompt are the adapter's;
    the reloaded adapter does the same."""
    image, label = _synthetic_case(0)
    label.array[:] = 0
    label.array[2, 10:20, 10:20] = 1  # one slice with the structure: no validation slices
    model, metadata = finetune([(image, label)], FinetuneConfig(model_name=TINY, steps=3, device="cpu",
                                                                encoder="frozen", embedding_budget=4,
                                                                decoder_lr=0.05))
    from MedFMSegmentLib.finetune.comparison import summary_line

    assert metadata["box_prompts"] == "base" and "keep the base model's decoder" in summary_line(metadata)
    base = tiny_random_model_for_tests()
    reloaded, _ = load_adapted_model(save_adapter(model, tmp_path / "a", metadata), model_name=TINY)
    embedding = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(1))
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])  # model-input pixels of the 64-px input
    with torch.no_grad():
        base_box, base_free = base.decode(embedding, boxes=box)[0], base.decode(embedding)[0]
        for adapted in (model, reloaded):
            torch.testing.assert_close(adapted.decode(embedding, boxes=box)[0], base_box, rtol=0, atol=0)
            assert not torch.allclose(adapted.decode(embedding)[0], base_free), "prompt-free output is the adapter's"
        torch.testing.assert_close(reloaded.decode(embedding)[0], model.decode(embedding)[0])
        own = model.decode(embedding, boxes=box, automatic=True)[0]  # automatic mode's re-prompt: the adapted decoder
        assert not torch.allclose(own, base_box)
        torch.testing.assert_close(reloaded.decode(embedding, boxes=box, automatic=True)[0], own)
        model.prompt_decoder = None  # without the base decoder, a user's boxes run the trained one too
        torch.testing.assert_close(model.decode(embedding, boxes=box)[0], own, rtol=0, atol=0)


def test_box_prompts_follow_the_validation_figures():
    from MedFMSegmentLib.finetune.box_prompts import choose_box_prompts

    assert choose_box_prompts("frozen", None, None) == "base"
    assert choose_box_prompts("frozen", {"box": 0.90}, {"box": 0.85}) == "base"
    assert choose_box_prompts("frozen", {"box": 0.85}, {"box": 0.85}) == "adapted"
    assert choose_box_prompts("frozen", {"box": None}, {"box": None}) == "base"
    assert choose_box_prompts("lora", None, None) == "adapted", "LoRA changes the embedding the base decoder needs"


def test_the_summary_says_why_box_prompts_keep_the_base_decoder():
    from MedFMSegmentLib.finetune.comparison import comparison_metadata, summary_line

    checked = {"box_prompts": "base", **comparison_metadata({"dice": 0.5, "box": 0.9, "automatic": 0.1},
                                                            {"dice": 0.6, "box": 0.9, "automatic": 0.3}, [[0, 2, 1]],
                                                            adapted_decoder={"dice": 0.55, "box": 0.8, "automatic": 0.3})}
    assert checked["validation_comparison"]["adapted_decoder"]["box"] == 0.8
    assert summary_line(checked).endswith("(1 slices); box prompts keep the base model's decoder, better with boxes there")
    unchecked = {"box_prompts": "base", **comparison_metadata({"dice": 0.1, "box": None, "automatic": 0.1},
                                                              {"dice": 0.3, "box": None, "automatic": 0.3}, [[0, 2, 1]],
                                                              adapted_decoder={"dice": 0.3, "box": None, "automatic": 0.3})}
    assert "no validation slice held the structure" in summary_line(unchecked)
    assert "box prompts" not in summary_line({**checked, "box_prompts": "adapted"})


def test_the_summary_says_which_engine_automatic_mode_uses_and_why():
    from MedFMSegmentLib.finetune.comparison import comparison_metadata, summary_line

    metadata = comparison_metadata({"dice": 0.5, "box": 0.8, "automatic": 0.2},
                                   {"dice": 0.6, "box": 0.8, "automatic": 0.4}, [[0, 2, 1]])
    unet = {**metadata, "automatic_engine": {"chosen": "unet", "held_out": ["a"], "unet_dice": 0.861,
                                             "adapter_dice": 0.802}}
    assert summary_line(unet).endswith("; automatic mode: its U-Net, held-out Dice 0.861 against the adapter's "
                                       "0.802 (1 volume)")
    adapter = {**metadata, "automatic_engine": {"chosen": "adapter", "held_out": ["a", "b"], "unet_dice": 0.7,
                                                "adapter_dice": 0.8}}
    assert summary_line(adapter).endswith("; automatic mode: the adapter, held-out Dice 0.800 against the U-Net's "
                                          "0.700 (2 volumes)")
    assert "automatic mode" not in summary_line({**metadata, "automatic_engine": {"chosen": "adapter", "why": "x"}})
