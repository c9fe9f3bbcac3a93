"""No model, tokenizer or processor is looked up on a hub: every model path must be a local
directory, checked before any loader sees the name (``gpt2`` must not reach the network)."""

from __future__ import annotations

import pytest
import torch
import transformers

from data_pipelines import cli as data_cli
from eval_fewshot import cli as eval_cli
from tests.train_world import stage_overrides
from train.config import load_config
from train.distributed import DistInfo

DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture
def no_hub_lookups(monkeypatch):
    """Fail the test if a Hugging Face ``from_pretrained`` is asked for anything at all."""
    def refuse(name, *args, **kwargs):
        raise AssertionError(f"from_pretrained was called with {name!r}")

    for cls in (transformers.AutoTokenizer, transformers.AutoImageProcessor,
                transformers.AutoConfig, transformers.AutoModel,
                transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.mark.parametrize("stage,key", [("flamingo", "flamingo.lm"),
                                       ("flamingo", "flamingo.vision"),
                                       ("contrastive", "contrastive.tokenizer")])
def test_a_bare_model_name_in_a_stage_is_refused_before_loading(world, no_hub_lookups,  # noqa: F811
                                                                 stage, key):
    from train.stages import build_stage

    cfg = load_config(None, stage_overrides(world, stage) + [f"{key}=gpt2"])
    with pytest.raises(FileNotFoundError, match=f"{key}: 'gpt2' is not a local directory"):
        build_stage(cfg, DIST)


def test_eval_cli_refuses_a_bare_model_name(no_hub_lookups, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--model", "gpt2", "--task", "synth_vqa"])
    assert exit_info.value.code == 2
    assert "--model: 'gpt2' is not a local directory" in capsys.readouterr().err


def test_data_cli_refuses_a_bare_tokenizer_name(world, no_hub_lookups, capsys):  # noqa: F811
    assert data_cli.main(["inspect", world["docs"], "--tokenizer", "gpt2"]) == 2
    assert "--tokenizer: 'gpt2' is not a local directory" in capsys.readouterr().err
