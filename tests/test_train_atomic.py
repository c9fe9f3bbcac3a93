"""Files the trainer writes are atomic: a crash mid-write leaves the old content or nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.train_world import REPO, stage_overrides
from train.atomic import atomic_directory, atomic_write_text
from train.config import load_config
from train.distributed import DistInfo

DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class Crash(Exception):
    """Stands in for a process dying in the middle of a write."""


def test_text_write_that_crashes_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "config.yaml")
    atomic_write_text(path, "steps: 1\n")
    real_fsync = os.fsync

    def crash_before_rename(fd):  # the new bytes are written, the rename has not happened
        real_fsync(fd)
        raise Crash

    monkeypatch.setattr(os, "fsync", crash_before_rename)
    with pytest.raises(Crash):
        atomic_write_text(path, "steps: 2\n" * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert open(path).read() == "steps: 1\n"
    assert os.listdir(tmp_path) == ["config.yaml"]  # no temporary left behind
    atomic_write_text(path, "steps: 3\n")
    assert open(path).read() == "steps: 3\n"


def test_directory_write_that_crashes_keeps_the_previous_directory(tmp_path):
    target = str(tmp_path / "final")
    with atomic_directory(target) as tmp:
        open(os.path.join(tmp, "a.json"), "w").write("{}")
    with pytest.raises(Crash):
        with atomic_directory(target) as tmp:
            open(os.path.join(tmp, "a.json"), "w").close()  # 0 bytes, then the crash
            raise Crash
    assert os.listdir(target) == ["a.json"] and open(os.path.join(target, "a.json")).read() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_directory_leftovers_of_a_killed_write_are_cleared(tmp_path):
    target = str(tmp_path / "tokenizer")
    os.makedirs(tmp_path / ".tokenizer.tmp")  # what a SIGKILL inside the block leaves
    open(tmp_path / ".tokenizer.tmp" / "stale.json", "w").close()
    with atomic_directory(target) as tmp:
        assert os.listdir(tmp) == []
        open(os.path.join(tmp, "tokenizer.json"), "w").write("{}")
    assert sorted(os.listdir(tmp_path)) == ["tokenizer"]
    assert os.listdir(target) == ["tokenizer.json"]


KILLED_TOKENIZER_WRITE = textwrap.dedent("""
    import os, signal, sys
    import torch
    from train.config import load_config
    from train.distributed import DistInfo
    from train.stages import lm

    real_train = lm.train_tokenizer

    def train_then_die_while_saving(*args, **kwargs):
        tokenizer = real_train(*args, **kwargs)

        def save_pretrained(directory, **_):
            os.makedirs(directory, exist_ok=True)
            open(os.path.join(directory, "tokenizer_config.json"), "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

        tokenizer.save_pretrained = save_pretrained
        return tokenizer

    lm.train_tokenizer = train_then_die_while_saving
    cfg = load_config(None, sys.argv[1:])
    docs = lm.read_corpus(cfg.lm.corpus)
    lm.prepare_tokenizer(cfg, docs, DistInfo(0, 0, 1, torch.device("cpu")))
""")


def test_sigkill_while_saving_the_tokenizer_does_not_break_the_rerun(world, tmp_path):  # noqa: F811
    """The LM stage's RUN/tokenizer after a SIGKILL mid-save: the next run trains it again."""
    from train.stages import lm

    overrides = [f"run_dir={tmp_path / 'run'}"] + stage_overrides(world, "lm")
    killed = subprocess.run([sys.executable, "-c", KILLED_TOKENIZER_WRITE, *overrides],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    cfg = load_config(None, overrides)
    tokenizer = lm.prepare_tokenizer(cfg, lm.read_corpus(cfg.lm.corpus), DIST)
    assert tokenizer("there is a red square.")["input_ids"]
    assert sorted(os.listdir(tmp_path / "run")) == ["tokenizer"]
