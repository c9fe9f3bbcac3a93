"""Resuming executes nothing stored in the run directory.

Every file a resume reads (the per-rank state, each kind of DeepSpeed engine file under ZeRO
0-3, the recorded ``config.yaml``) is replaced in turn by a payload that would create a marker
file when unpickled or YAML-constructed; the resume must refuse it with an error naming the
file, and the marker must not exist.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.train_world import common_overrides, stage_overrides
from train import checkpoint
from train.config import load_config
from train.recipe import run, setup


class Payload:
    """Unpickling this calls ``open(marker, "w")``: code chosen by whoever wrote the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _poison(path: str, marker: str) -> None:
    """Overwrite ``path`` with a torch-saved pickle that runs code when loaded unsafely."""
    torch.save({"module": Payload(marker), "optimizer_state_dict": Payload(marker)}, path)


def _files(directory: str) -> list[str]:
    """Every file of a checkpoint except DeepSpeed's conversion scripts (zero_to_fp32.py ...),
    which resume never reads."""
    return sorted(os.path.relpath(os.path.join(d, f), directory)
                  for d, _, names in os.walk(directory) for f in names if not f.endswith(".py"))


def _lm_config(world, run_dir, steps, *extra):  # noqa: F811
    return load_config(None, common_overrides(run_dir, steps) + stage_overrides(world, "lm")
                       + list(extra))


@pytest.mark.parametrize("zero_stage", [0, 1, 3])
def test_no_checkpoint_file_can_run_code_on_resume(world, single_process, tmp_path,  # noqa: F811
                                                    zero_stage):
    zero = f"deepspeed.zero_stage={zero_stage}"
    run(_lm_config(world, str(tmp_path / "run"), 1, zero))
    saved = checkpoint.latest_checkpoint(str(tmp_path / "run"))
    names = _files(saved)
    assert any(name.startswith("engine/") for name in names) and len(names) >= 3

    # A fresh session of the same shape to resume into (as `python -m train` would build).
    s = setup(_lm_config(world, str(tmp_path / "other"), 2, zero))
    marker = str(tmp_path / "code-ran")
    try:
        for name in names:
            poisoned = str(tmp_path / "poisoned")
            shutil.rmtree(poisoned, ignore_errors=True)
            shutil.copytree(saved, poisoned)
            _poison(os.path.join(poisoned, name), marker)
            with pytest.raises(checkpoint.CheckpointError) as error:
                checkpoint.load_checkpoint(s.engine, poisoned, s.dist)
            assert os.path.join(poisoned, name) in str(error.value), name
            assert not os.path.exists(marker), f"loading {name} ran code"
        state = checkpoint.load_checkpoint(s.engine, saved, s.dist)  # the untouched one loads
        assert state["step"] == 1
    finally:
        s.logger.close()


def test_recorded_config_cannot_run_code_on_resume(world, single_process, tmp_path):  # noqa: F811
    run_dir = str(tmp_path / "run")
    run(_lm_config(world, run_dir, 1))
    marker = str(tmp_path / "code-ran")
    recorded = os.path.join(run_dir, "config.yaml")
    with open(recorded, "w") as f:
        f.write(f"stage: !!python/object/apply:builtins.open [{marker!r}, w]\n")
    with pytest.raises(ValueError, match="config.yaml"):
        setup(_lm_config(world, run_dir, 2))
    assert not os.path.exists(marker)
