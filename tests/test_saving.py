"""Saved models travel and verify themselves: self-contained directories, relative paths,
fingerprints of the frozen parts, parts supplied at load time, older directories."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from flamingo_kit import FlamingoConfig, FlamingoModel, FlamingoProcessor
from flamingo_kit.from_scratch import TINY_FLAMINGO, build_lm, build_vision, open_gates
from flamingo_kit.part_records import PartMismatchError
from tests.conftest import random_image, randomize_all


def save_parts(root, lm_seed: int = 0, family: str = "llama"):
    """An LM and a vision tower saved as plain HF directories under ``root``."""
    build_lm(family, seed=lm_seed, vocab_size=300).save_pretrained(root / "lm")
    build_vision("clip", seed=0).save_pretrained(root / "vision")
    return root / "lm", root / "vision"


def model_from(lm, vision, processor=None, **overrides) -> FlamingoModel:
    torch.manual_seed(0)
    config = FlamingoConfig(**{**TINY_FLAMINGO, **overrides})
    return FlamingoModel.from_parts(lm, vision, config, processor=processor)


def prompts(processor):
    return processor([[random_image(1), "a red circle<|endofchunk|>", random_image(2), "a blue"],
                      ["a text-only prompt"]], padding_side="left")


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def read_config(directory) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def write_config(directory, data: dict) -> None:
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("overrides", [
    {},
    {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
    {"freeze_vision": False},
], ids=["frozen", "lora", "trained-vision"])
def test_self_contained_directory_moves_with_identical_logits(processor, tmp_path, overrides):
    """A self-contained directory, moved after its source parts are deleted, loads exactly."""
    lm_dir, vision_dir = save_parts(tmp_path / "src")
    model = model_from(lm_dir, vision_dir, processor, **overrides)
    randomize_all(model, seed=1)  # every weight, frozen parts included
    final = tmp_path / "run" / "final"
    model.save_pretrained(final, self_contained=True)
    processor.save_pretrained(final)
    batch = prompts(processor)
    expected = logits(model, batch)

    moved = tmp_path / "other_machine" / "copy"
    shutil.move(tmp_path / "run", moved)
    shutil.rmtree(tmp_path / "src")
    loaded = FlamingoModel.from_pretrained(moved / "final")
    loaded_processor = FlamingoProcessor.from_pretrained(moved / "final")
    moved_batch = prompts(loaded_processor)
    for key in batch:
        assert torch.equal(batch[key], moved_batch[key]), key
    assert torch.equal(logits(loaded, moved_batch), expected)

    config = read_config(moved / "final")
    assert config["lm_source"]["path"] == "lm" and config["vision_source"]["path"] == "vision"
    assert str(tmp_path) not in json.dumps(config)  # nothing points at the old place
    files = {p.relative_to(moved / "final").as_posix() for p in (moved / "final").rglob("*")}
    assert {"lm/model.safetensors", "vision/model.safetensors", "model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)


def test_parts_outside_are_recorded_relative_and_move_with_the_tree(processor, tmp_path):
    """Parts beside the model directory are found again after the whole tree moves."""
    runs = tmp_path / "runs"
    lm_dir, vision_dir = save_parts(runs)
    model = model_from(lm_dir, vision_dir, processor)
    randomize_all(model, seed=2)
    with torch.no_grad():  # frozen parts as on disk: only the trainable weights change
        model.lm.load_state_dict(model_from(lm_dir, vision_dir).lm.state_dict())
        model.vision.tower.load_state_dict(model_from(lm_dir, vision_dir).vision.tower.state_dict())
    model.save_pretrained(runs / "flamingo" / "final")
    expected = logits(model, prompts(processor))
    source = read_config(runs / "flamingo" / "final")["lm_source"]
    assert source["path"] == os.path.join("..", "..", "lm")
    assert source["saved_at"] == str(lm_dir)

    shutil.move(runs, tmp_path / "moved")
    loaded = FlamingoModel.from_pretrained(tmp_path / "moved" / "flamingo" / "final")
    assert torch.equal(logits(loaded, prompts(processor)), expected)


def test_another_lm_of_the_same_shape_is_refused(processor, tmp_path):
    """Pointing the recorded path (or lm=) at a different LM of the same shape fails clearly."""
    lm_dir, vision_dir = save_parts(tmp_path)
    model = model_from(lm_dir, vision_dir, processor)
    open_gates(model, 0.5)
    model.save_pretrained(tmp_path / "model")
    expected = logits(model, prompts(processor))
    shutil.rmtree(lm_dir)
    build_lm("llama", seed=1, vocab_size=300).save_pretrained(lm_dir)  # same shape, other weights

    with pytest.raises(PartMismatchError, match=r"the LM at .*lm' is not the one .* weights sha256"
                       r".*from_pretrained\(.*lm=<directory or module>\).*allow_different_parts"):
        FlamingoModel.from_pretrained(tmp_path / "model")
    with pytest.raises(PartMismatchError, match="the LM at"):
        FlamingoModel.from_pretrained(tmp_path / "model", lm=lm_dir)

    # The right LM supplied from elsewhere (here a module) loads exactly.
    right = build_lm("llama", seed=0, vocab_size=300)
    loaded = FlamingoModel.from_pretrained(tmp_path / "model", lm=right)
    assert torch.equal(logits(loaded, prompts(processor)), expected)

    # A deliberate swap is possible, and says so.
    with pytest.warns(UserWarning, match="allow_different_parts=True"):
        swapped = FlamingoModel.from_pretrained(tmp_path / "model", allow_different_parts=True)
    assert not torch.allclose(logits(swapped, prompts(processor)), expected)


def test_same_weights_under_another_config_are_named(tmp_path):
    """The config half of the fingerprint: equal tensors, one changed setting, named in the error."""
    lm_dir, vision_dir = save_parts(tmp_path)
    model_from(lm_dir, vision_dir).save_pretrained(tmp_path / "model")
    config = json.loads((lm_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (lm_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(PartMismatchError, match=r"config differs \(rms_norm_eps: 1e-06 -> 0\.001\)"):
        FlamingoModel.from_pretrained(tmp_path / "model")


def test_fingerprint_is_the_same_for_bin_and_sharded_safetensors(tmp_path):
    """The fingerprint hashes tensors, so the same weights in other files still verify."""
    lm_dir, vision_dir = save_parts(tmp_path)
    model_from(lm_dir, vision_dir).save_pretrained(tmp_path / "model")
    lm = build_lm("llama", seed=0, vocab_size=300)
    lm.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    FlamingoModel.from_pretrained(tmp_path / "model", lm=tmp_path / "sharded")
    os.makedirs(tmp_path / "bin")
    shutil.copy(lm_dir / "config.json", tmp_path / "bin")
    torch.save(lm.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    FlamingoModel.from_pretrained(tmp_path / "model", lm=tmp_path / "bin")


def test_dtype_of_the_model_and_of_a_given_part(tmp_path):
    """Parts verify in their recorded dtype; dtype= then casts. A bf16 part gets a dtype hint."""
    lm_dir, vision_dir = save_parts(tmp_path)
    model_from(lm_dir, vision_dir).save_pretrained(tmp_path / "model", self_contained=True)
    loaded = FlamingoModel.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    half = build_lm("llama", seed=0, vocab_size=300).to(torch.bfloat16)
    with pytest.raises(PartMismatchError, match="its weights are bfloat16, the recorded ones float32"):
        FlamingoModel.from_pretrained(tmp_path / "model", lm=half)


def test_missing_part_says_where_it_looked_and_what_to_do(tmp_path):
    lm_dir, vision_dir = save_parts(tmp_path)
    model_from(lm_dir, vision_dir).save_pretrained(tmp_path / "model")
    shutil.rmtree(vision_dir)
    with pytest.raises(FileNotFoundError, match=r"vision tower .* is not at .*vision.*vision=<"
                       r"directory or module>.*self_contained=True"):
        FlamingoModel.from_pretrained(tmp_path / "model")


def test_resaving_a_loaded_model(tmp_path, processor):
    """A loaded self-contained model saves again in place, and elsewhere by reference."""
    lm_dir, vision_dir = save_parts(tmp_path / "src")
    model = model_from(lm_dir, vision_dir, processor)
    open_gates(model, 0.5)
    model.save_pretrained(tmp_path / "a", self_contained=True)
    loaded = FlamingoModel.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "a", self_contained=True)
    loaded.save_pretrained(tmp_path / "b")
    assert read_config(tmp_path / "b")["lm_source"]["path"] == os.path.join("..", "a", "lm")
    expected = logits(model, prompts(processor))
    for name in ("a", "b"):
        assert torch.equal(logits(FlamingoModel.from_pretrained(tmp_path / name),
                                  prompts(processor)), expected)


def test_format_version_1_loads_with_a_warning(tmp_path, processor):
    """Directories written before fingerprints existed still load, unverified, and say so."""
    lm_dir, vision_dir = save_parts(tmp_path)
    model = model_from(lm_dir, vision_dir, processor)
    open_gates(model, 0.5)
    model.save_pretrained(tmp_path / "model")
    data = read_config(tmp_path / "model")
    data.update(format_version=1, lm_source={"path": str(lm_dir)},
                vision_source={"path": str(vision_dir)})
    write_config(tmp_path / "model", data)
    with pytest.warns(UserWarning, match="format_version 1, which records no fingerprints"):
        loaded = FlamingoModel.from_pretrained(tmp_path / "model")
    assert torch.equal(logits(loaded, prompts(processor)), logits(model, prompts(processor)))

    data["format_version"] = 99
    write_config(tmp_path / "model", data)
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        FlamingoModel.from_pretrained(tmp_path / "model")


def test_format_version_2_names_of_the_media_token_rows_load(tmp_path, processor):
    """Directories saved before format_version 3 name the media-token rows ``new_token_*``."""
    from safetensors.torch import load_file, save_file

    lm_dir, vision_dir = save_parts(tmp_path)
    model = randomize_all(model_from(lm_dir, vision_dir, processor), 2).eval()
    model.save_pretrained(tmp_path / "model", self_contained=True)
    weights = tmp_path / "model" / "model.safetensors"
    old_names = {"media_tokens.embedding.weight": "new_token_embeddings",
                 "media_tokens.head.weight": "new_token_head",
                 "media_tokens.head.bias": "new_token_head_bias"}
    save_file({old_names.get(k, k): v for k, v in load_file(weights).items()}, weights)
    data = read_config(tmp_path / "model")
    write_config(tmp_path / "model", {**data, "format_version": 2})
    loaded = FlamingoModel.from_pretrained(tmp_path / "model")
    assert torch.equal(logits(loaded, prompts(processor)), logits(model, prompts(processor)))

    write_config(tmp_path / "model", data)  # the old names in a version 3 directory: refused
    with pytest.raises(KeyError, match="unexpected keys.*new_token_embeddings"):
        FlamingoModel.from_pretrained(tmp_path / "model")


def test_record_without_its_fingerprint_is_refused(tmp_path):
    lm_dir, vision_dir = save_parts(tmp_path)
    model_from(lm_dir, vision_dir).save_pretrained(tmp_path / "model")
    data = read_config(tmp_path / "model")
    del data["lm_source"]["sha256"]
    write_config(tmp_path / "model", data)
    with pytest.raises(PartMismatchError, match="lm record has no sha256"):
        FlamingoModel.from_pretrained(tmp_path / "model")


def test_a_copy_of_the_model_alone_finds_its_parts_where_they_were_saved(tmp_path):
    """The relative path comes first; when it is missing or holds another part, the path
    recorded at save time (same machine) is used, still verified."""
    lm_dir, vision_dir = save_parts(tmp_path / "runs")
    model_from(lm_dir, vision_dir).save_pretrained(tmp_path / "runs" / "flamingo")
    shutil.copytree(tmp_path / "runs" / "flamingo", tmp_path / "copies" / "flamingo")
    FlamingoModel.from_pretrained(tmp_path / "copies" / "flamingo")  # ../lm does not exist there
    save_parts(tmp_path / "copies", lm_seed=3)  # ../lm exists there now, but is another LM
    loaded = FlamingoModel.from_pretrained(tmp_path / "copies" / "flamingo")
    assert loaded.config.lm_source == {"path": str(lm_dir)}
