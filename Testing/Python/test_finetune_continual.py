"""Continuing an adapter (``finetune --from``) and the from-scratch MONAI baseline (plumbing).

The tiny random model stands in for LiteMedSAM (``test_finetune.tiny_model_by_name``); Dice
figures of continuing on real data are the learning-curve benchmark's (bench/learning_curves.py).
"""
import pytest
import torch

from MedFMSegmentLib import loading, models
from MedFMSegmentLib.cli import main
from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.finetune.adapter_format import read_metadata, weights_sha256
from MedFMSegmentLib.finetune.adapters import load_adapted_model, trainable_state
from MedFMSegmentLib.finetune.baseline import BaselineConfig, predict_baseline, train_baseline
from MedFMSegmentLib.finetune.continual import (CONTINUE_FRACTION, config_from_parent, continue_adapter, load_parent,
                                                update_adapter)
from MedFMSegmentLib.finetune.trainer import prepare_model
from MedFMSegmentLib.io import MedicalImage
from MedFMSegmentLib.models import tiny_random_model_for_tests
from test_finetune import _synthetic_case, tiny_model_by_name  # noqa: F401 (fixture)
from test_reliability_finetune import _write_case, case_files, trained  # noqa: F401


def test_continuing_starts_from_the_parents_weights(trained):
    parent = load_parent(trained)
    config = config_from_parent(parent, device="cpu")
    assert config.encoder == parent.metadata["encoder"]
    assert config.steps == max(1, round(CONTINUE_FRACTION * parent.metadata["steps_planned"]))
    model, *_ = prepare_model(config, config.encoder, tiny_random_model_for_tests(), parent)
    state = trainable_state(model)
    assert state.keys() == parent.state.keys()
    assert all(torch.equal(state[k], parent.state[k]) for k in state)
    fresh, *_ = prepare_model(config, config.encoder, tiny_random_model_for_tests(), None)
    assert not all(torch.equal(trainable_state(fresh)[k], state[k]) for k in state)


def test_from_records_lineage_and_replays_the_parents_cases(trained, tmp_path, capsys):
    new = _write_case(tmp_path / "data", 2)
    child = tmp_path / "out" / "child"
    argv = ["finetune", "--from", str(trained), "--device", "cpu", "--steps", "2", "--embedding-budget", "8",
            "--image", new[0], "--label", new[1], "-o", str(child)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "2 of the parent's cases replayed" in capsys.readouterr().out
    meta = read_metadata(child)
    entry = meta["lineage"][-1]
    assert entry["parent_weights_sha256"] == weights_sha256(trained)
    assert entry["cases_added"] == 1 and entry["cases_replayed"] == 2 and entry["names_added"] == [new[1]]
    assert entry["date"] and meta["training_cases"]["count"] == 3
    assert meta["base_model"] == read_metadata(trained)["base_model"]
    load_adapted_model(child, base_model=tiny_random_model_for_tests())
    # grandchild: the chain grows, new cases only
    grandchild = tmp_path / "out" / "grandchild"
    argv[argv.index(str(trained))] = str(child)
    argv[argv.index(str(child), argv.index("-o"))] = str(grandchild)
    assert main(argv + ["--no-replay"]) == 0
    chain = read_metadata(grandchild)["lineage"]
    assert len(chain) == 2 and chain[-1]["cases_replayed"] == 0
    assert chain[-1]["parent_weights_sha256"] == weights_sha256(child)


def test_a_parent_for_another_base_model_is_refused(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: tiny_random_model_for_tests(seed=1))
    new = _write_case(tmp_path / "data", 2)
    out = tmp_path / "out" / "child"
    code = main(["finetune", "--from", str(trained), "--device", "cpu", "--steps", "2", "--embedding-budget", "8",
                 "--image", new[0], "--label", new[1], "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "trained on base model" in err, err
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["adapter"]
    with pytest.raises(InputError, match="keeps its parent's"):
        config_from_parent(load_parent(trained), lora_rank=8)


def test_update_adapter_in_place_from_arrays(trained):
    """The Slicer module's "Update adapter": arrays in, the adapter replaced only when complete."""
    image, label = _synthetic_case(3)
    before = weights_sha256(trained)
    metadata = update_adapter(trained, [image.array], [label.array], trained, steps=2, embedding_budget=8,
                              device="cpu", base_model=tiny_random_model_for_tests())
    assert metadata["lineage"][-1]["parent_weights_sha256"] == before
    assert weights_sha256(trained) != before and read_metadata(trained)["lineage"]
    assert sorted(p.name for p in trained.parent.iterdir()) == ["adapter"]
    with pytest.raises(InputError, match="shape"):
        update_adapter(trained, [image.array], [label.array[:, :5]], trained, steps=1,
                       base_model=tiny_random_model_for_tests())
    with pytest.raises(InputError, match="at least one new case"):
        continue_adapter(trained, [], base_model=tiny_random_model_for_tests())


@pytest.mark.parametrize("is_2d", [False, True])
def test_baseline_trains_and_predicts_on_the_tiny_case(is_2d):
    image, label = _synthetic_case(0)
    if is_2d:
        image, label = MedicalImage.from_array(image.array[2]), MedicalImage.from_array(label.array[2])
    config = BaselineConfig(seconds=60, max_steps=3, channels=(4, 8), image_side=32, batch_size=1)
    reports = []
    model = train_baseline([(image, label)], config, progress=reports.append)
    assert model.steps == 3 and [r["step"] for r in reports] == [1, 2, 3] and model.spatial_dims == (2 if is_2d else 3)
    mask = predict_baseline(model, image)
    assert mask.shape == image.array.shape and mask.dtype == bool
    with pytest.raises(InputError):
        train_baseline([], config)
