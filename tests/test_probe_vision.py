"""The vision-tower linear probe: it finds an attribute the features encode and only then."""

from __future__ import annotations

import json
import random

import pytest
import torch

from data_pipelines.synthetic.evalsets import write_classification
from data_pipelines.synthetic.scenes import UniqueImages
from flamingo_kit import from_scratch
from train import probe_vision


def labelled_features(n: int, encode_label: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=generator)
    features = torch.randn(n, 16, generator=generator)
    if encode_label:
        features[:, :5] += 3 * torch.nn.functional.one_hot(labels, 5).float()
    return features, labels


@pytest.mark.parametrize("encode_label", [True, False])
def test_probe_accuracy_follows_what_the_features_encode(encode_label):
    train_x, train_y = labelled_features(200, encode_label, seed=0)
    test_x, test_y = labelled_features(200, encode_label, seed=1)
    _, test_acc = probe_vision.linear_probe(train_x, train_y, test_x, test_y, n_classes=5)
    if encode_label:
        assert test_acc > 0.9
    else:
        assert test_acc < 0.35  # chance is 0.2


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("classification"))
    write_classification(root, random.Random(0), UniqueImages(32), 15)
    return root


def test_cli_probes_a_saved_tower_on_a_classification_set(world, shapes_set, capsys):
    assert probe_vision.main([world["vision"], "--data", shapes_set, "--steps", "50",
                              "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["classes"] == ["circle", "square", "triangle", "diamond", "cross"]
    assert (result["n_train"], result["n_test"]) == (15, 15)
    assert result["chance"] == pytest.approx(0.2)
    assert set(result["test_accuracy"]) == set(probe_vision.FEATURES)
    assert all(0 <= v <= 1 for v in result["test_accuracy"].values())
    assert probe_vision.main([world["vision"], "--data", shapes_set, "--steps", "50"]) == 0
    assert "patch_mean" in capsys.readouterr().out


def test_cli_names_a_missing_file(world, tmp_path, capsys):
    assert probe_vision.main([world["vision"], "--data", str(tmp_path)]) == 2
    assert "classes.json" in capsys.readouterr().err


def test_cli_probes_a_convnet_tower(shapes_set, tmp_path, capsys):
    tower_dir = str(tmp_path / "bit")
    from_scratch.build_vision("bit", hidden_size=32, num_layers=2).save_pretrained(tower_dir)
    from_scratch.image_processor(32).save_pretrained(tower_dir)
    assert probe_vision.main([tower_dir, "--data", shapes_set, "--steps", "50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["test_accuracy"]) == set(probe_vision.FEATURES)
