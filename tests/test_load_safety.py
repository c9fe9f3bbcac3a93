"""Loading a saved model never runs code: a pickle payload in any file of a saved directory,
or in the weights of a part supplied from elsewhere, is refused with an error naming the file."""

from __future__ import annotations

import builtins
import io
import shutil
from pathlib import Path

import pytest
import torch

from flamingo_kit import FlamingoModel, FlamingoProcessor
from tests.conftest import build_model


class Payload:
    """Unpickling this object creates the file ``marker`` (what an attacker's code would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def payload_bytes(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": Payload(marker)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def saved(processor, tmp_path):
    model = build_model("gpt2", processor=processor)
    model.save_pretrained(tmp_path / "saved", self_contained=True)
    processor.save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def test_the_payload_would_run_if_unpickled(tmp_path):
    """The tests below can fail: an unsafe load of the payload does create the marker."""
    (tmp_path / "p.bin").write_bytes(payload_bytes(tmp_path / "marker"))
    torch.load(tmp_path / "p.bin", weights_only=False)
    assert (tmp_path / "marker").exists()


def test_no_file_of_a_saved_directory_runs_code(saved, tmp_path):
    """Each file in turn replaced by a payload: loading fails naming it (or ignores it)."""
    marker = tmp_path / "marker"
    files = sorted(p.relative_to(saved) for p in saved.rglob("*") if p.is_file())
    assert len(files) >= 10
    outcomes = {}
    for rel in files:
        victim = tmp_path / "victim"
        shutil.rmtree(victim, ignore_errors=True)
        shutil.copytree(saved, victim)
        (victim / rel).write_bytes(payload_bytes(marker))
        for load in (FlamingoModel.from_pretrained, FlamingoProcessor.from_pretrained):
            try:
                load(victim)
                outcomes[rel, load.__qualname__] = "loaded"
            except (ValueError, OSError) as error:
                named = str(victim / rel) in str(error) or (
                    rel.name in str(error) and str(victim / rel.parent) in str(error))
                assert named or str(victim) in str(error), f"{rel}: {error}"
                outcomes[rel, load.__qualname__] = "refused"
            assert not marker.exists(), f"code ran while loading {rel}"
    # Every file either model or processor reads is refused by that loader.
    for rel in ("config.json", "model.safetensors", "lm/model.safetensors", "lm/config.json",
                "vision/model.safetensors", "vision/config.json"):
        assert outcomes[Path(rel), "FlamingoModel.from_pretrained"] == "refused", rel
    for rel in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                "flamingo_processor_config.json"):
        assert outcomes[Path(rel), "FlamingoProcessor.from_pretrained"] == "refused", rel


@pytest.mark.parametrize("part", ["lm", "vision"])
def test_pickled_weights_beside_a_saved_model_are_never_read(saved, tmp_path, part):
    """Parts written into a saved directory load from safetensors only."""
    (saved / part / "model.safetensors").unlink()
    (saved / part / "pytorch_model.bin").write_bytes(payload_bytes(tmp_path / "marker"))
    with pytest.raises(OSError, match=f"model.safetensors.*{saved / part}"):
        FlamingoModel.from_pretrained(saved)
    assert not (tmp_path / "marker").exists()


def test_a_supplied_part_with_pickled_code_is_refused(saved, tmp_path):
    """A part from elsewhere may be a .bin, loaded weights-only: code in it never runs."""
    evil = tmp_path / "evil_lm"
    shutil.copytree(saved / "lm", evil)
    (evil / "model.safetensors").unlink()
    (evil / "pytorch_model.bin").write_bytes(payload_bytes(tmp_path / "marker"))
    message = f"{evil / 'pytorch_model.bin'} holds objects other than tensors; they were not unpickled"
    with pytest.raises(ValueError, match=message):
        FlamingoModel.from_pretrained(saved, lm=evil)
    with pytest.raises(ValueError, match=message):
        FlamingoModel.from_parts(evil, saved / "vision")
    assert not (tmp_path / "marker").exists()
