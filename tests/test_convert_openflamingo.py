"""OpenFlamingo checkpoints convert into models that compute OpenFlamingo's logits exactly.

The reference is OpenFlamingo's own code (open-flamingo 2.0.1, see ``tests/openflamingo_ref.py``
for how it is loaded without open_clip): its factory builds the model around a tiny LM and a
tiny CLIP tower, every trainable weight is randomised (resampler, gates, cross-attention, the
whole input embedding as OpenFlamingo trains it), its training code filters ``checkpoint.pt``,
and ``flamingo-convert`` turns that into our format. LM families: Llama (tied embeddings,
vocabulary grows by three rows, ``<PAD>`` added), GPT-NeoX (untied head saved under its
transformers-4 name ``embed_out``, vocabulary shrinks as RedPajama's did) and MPT (the 9B's LM).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from data_pipelines.tokenizer import train_tokenizer
from eval_fewshot import cli as eval_cli
from eval_fewshot.toy import write_toy_eval_sets
from flamingo_kit import FlamingoModel, FlamingoProcessor, from_scratch
from flamingo_kit.convert import ConversionError, convert_openflamingo, load_checkpoint
from flamingo_kit.convert import cli as convert_cli
from tests.conftest import CORPUS, random_image, randomize_all
from tests.openflamingo_ref import (
    build_openflamingo,
    openflamingo_root,
    save_openflamingo_checkpoint,
)
from tests.train_world import common_overrides, stage_overrides
from train.config import load_config
from train.recipe import run

_MISSING = [name for name, found in (("open-flamingo", openflamingo_root() is not None),
                                     ("einops", importlib.util.find_spec("einops") is not None),
                                     ("einops-exts", importlib.util.find_spec("einops_exts")
                                      is not None)) if not found]
if _MISSING:
    _WHY = (f"OpenFlamingo reference code not installed ({', '.join(_MISSING)}); `make test` "
            "installs it with --no-deps (make test-references)")
    if os.environ.get("CI"):  # CI installs it: a missing reference there is a failure
        pytest.fail(_WHY, pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)

IMAGE_SIZE = 32
PROMPTS = [  # 0, 1 and 3 images; text before the first image in the second
    ("a red circle is above a blue square.", []),
    ("Output: <image>a red circle.<|endofchunk|> Question: what", [1]),
    ("<image>two green triangles<|endofchunk|><image>The cat sits<|endofchunk|>It is <image>small",
     [2, 3, 4]),
]
# family: (tie embeddings, LM rows beyond the tokenizer, tokenizer keeps its pad, xattn every)
FAMILIES = {
    "llama": (True, 0, False, 2),
    "gpt_neox": (False, 8, True, 2),
    "mpt": (True, 20, False, 1),
}


def make_world(root: str, family: str, tie: bool = True, extra_rows: int = 0,
               keep_pad: bool = True, seed: int = 0) -> dict[str, str]:
    """LM directory (tokenizer included) and CLIP directory, trained-like random weights."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=300, add_media_tokens=False)
    if not keep_pad:
        tokenizer.pad_token = None
    config = from_scratch.lm_config(family, vocab_size=len(tokenizer) + extra_rows, hidden_size=64,
                            num_layers=4, num_heads=4)
    config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    lm = randomize_all(AutoModelForCausalLM.from_config(config).eval(), seed)
    paths = {"lm": os.path.join(root, "lm"), "clip": os.path.join(root, "clip"),
             "checkpoint": os.path.join(root, "checkpoint.pt"), "out": os.path.join(root, "out")}
    lm.save_pretrained(paths["lm"])
    tokenizer.save_pretrained(paths["lm"])
    clip = randomize_all(from_scratch.build_vision("clip", seed=seed + 1, image_size=IMAGE_SIZE), seed + 1)
    clip.save_pretrained(paths["clip"])
    from_scratch.image_processor(IMAGE_SIZE).save_pretrained(paths["clip"])
    return paths


def train_like(model, seed: int = 0) -> None:
    """Randomise what OpenFlamingo trains: resampler, cross-attention, input embedding."""
    randomize_all(model.perceiver, seed + 10)
    randomize_all(model.lang_encoder.gated_cross_attn_layers, seed + 11)
    randomize_all(model.lang_encoder.get_input_embeddings(), seed + 12)


def openflamingo_checkpoint(paths, every: int, ln_post_on_tokens: bool = False,
                            head_saved_as: str | None = None):
    """Build OpenFlamingo on the world, randomise, write its checkpoint; return model, tokenizer.

    ``head_saved_as``: under transformers 4 (where OpenFlamingo ran) GPT-NeoX's head is
    ``embed_out``, which ``filter_state_dict_to_trainable`` keeps ("embed" is in its name);
    transformers 5 calls it ``lm_head`` and the filter drops it. The head is then added under
    the old name, as the released RedPajama checkpoints hold it.
    """
    clip = from_scratch.build_vision("clip", image_size=IMAGE_SIZE)
    clip = type(clip).from_pretrained(paths["clip"]).eval()
    model, tokenizer = build_openflamingo(paths["lm"], clip, every, ln_post_on_tokens)
    train_like(model)
    state = save_openflamingo_checkpoint(model, paths["checkpoint"])
    if head_saved_as:
        head = model.lang_encoder.get_output_embeddings().weight
        state[f"lang_encoder.{head_saved_as}"] = head.detach().clone()
        torch.save(state, paths["checkpoint"])
    return model, tokenizer


def convert_family(family: str, root: str):
    """(family, OpenFlamingo model, its tokenizer, our model, our processor, paths)."""
    tie, extra, keep_pad, every = FAMILIES[family]
    paths = make_world(root, family, tie, extra, keep_pad)
    head_saved_as = "embed_out.weight" if family == "gpt_neox" else None
    reference, tokenizer = openflamingo_checkpoint(paths, every, head_saved_as=head_saved_as)
    convert_cli.main(["openflamingo", "--checkpoint", paths["checkpoint"], "--lm", paths["lm"],
                      "--vision", paths["clip"], "--out", paths["out"]])
    model = FlamingoModel.from_pretrained(paths["out"]).eval()
    processor = FlamingoProcessor.from_pretrained(paths["out"])
    return family, reference, tokenizer, model, processor, paths


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """family -> converted world, built once per module on first use."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = convert_family(family, str(tmp_path_factory.mktemp(f"of_{family}")))
        return cache[family]

    return get


@pytest.fixture(params=sorted(FAMILIES))
def converted(request, conversions):
    return conversions(request.param)


def encode(processor, prompts=PROMPTS):
    """Right-padded batch of the prompts with their images."""
    texts = [text for text, _ in prompts]
    images = [[random_image(seed) for seed in seeds] for _, seeds in prompts]
    return processor(texts, images=images)


def openflamingo_pixels(batch) -> torch.Tensor:
    """OpenFlamingo always needs ``vision_x``; a text-only batch gets one unused blank image."""
    pixels = batch.get("pixel_values")
    b = batch["input_ids"].shape[0]
    return pixels if pixels is not None else torch.zeros(b, 1, 1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_logits_equal_openflamingos(converted):
    """Logits at every real token of prompts with 0, 1 and 3 images (text before the first
    image included) equal OpenFlamingo's to 1e-5, over the whole vocabulary."""
    family, reference, tokenizer, model, processor, _ = converted
    batch = encode(processor)
    for row, (text, _) in enumerate(PROMPTS):  # the same token ids as OpenFlamingo's tokenizer
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert ids.tolist() == tokenizer(text)["input_ids"]
    with torch.no_grad():
        ours = model(**batch).logits
        ref = reference(vision_x=openflamingo_pixels(batch), lang_x=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits
    assert ours.shape == ref.shape
    real = batch["attention_mask"].bool()
    diff = (ours - ref).abs()[real].max().item()
    assert diff <= 1e-5, f"{family}: max |logit difference| {diff:.2e}"


def test_greedy_generation_equals_openflamingos(converted):
    """Ten greedy tokens per prompt are OpenFlamingo's (which is told, as ours does by design,
    never to emit <image>: a generated image token would have no image)."""
    _, reference, _, model, processor, _ = converted
    for text, seeds in PROMPTS:
        batch = encode(processor, [(text, seeds)])
        with torch.no_grad():
            ours = model.generate(batch["input_ids"], batch["attention_mask"],
                                  batch.get("pixel_values"), max_new_tokens=10,
                                  eos_token_id=reference.eoc_token_id)
            ref = reference.generate(vision_x=openflamingo_pixels(batch),
                                     lang_x=batch["input_ids"],
                                     attention_mask=batch["attention_mask"], max_new_tokens=10,
                                     suppress_tokens=[reference.media_token_id])
        ref = ref[:, batch["input_ids"].shape[1]:]
        assert ours.tolist() == ref[:, : ours.shape[1]].tolist(), text
        assert ours.shape[1] == 10 or ours[0, -1].item() == reference.eoc_token_id


def test_post_layernorm_tokens_match_openflamingo_on_recent_open_clip(tmp_path):
    """open_clip >= 2.23 hands OpenFlamingo tokens after ln_post: --vision-features
    post_layernorm reproduces that, and the default (tokens before ln_post) does not."""
    paths = make_world(str(tmp_path), "llama", keep_pad=False)
    reference, _ = openflamingo_checkpoint(paths, every=2, ln_post_on_tokens=True)
    args = ["openflamingo", "--checkpoint", paths["checkpoint"], "--lm", paths["lm"],
            "--vision", paths["clip"]]
    convert_cli.main(args + ["--out", paths["out"], "--vision-features", "post_layernorm"])
    convert_cli.main(args + ["--out", str(tmp_path / "pre"), "--self-contained"])
    assert os.path.isfile(str(tmp_path / "pre" / "vision" / "config.json"))
    batch = encode(FlamingoProcessor.from_pretrained(paths["out"]), PROMPTS[1:])
    with torch.no_grad():
        ref = reference(vision_x=batch["pixel_values"], lang_x=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits
        post = FlamingoModel.from_pretrained(paths["out"])(**batch).logits
        pre = FlamingoModel.from_pretrained(str(tmp_path / "pre"))(**batch).logits
    real = batch["attention_mask"].bool()
    assert (post - ref).abs()[real].max() <= 1e-5
    assert (pre - ref).abs()[real].max() > 1e-3


def test_unsaved_head_rows_are_reported_and_all_other_logits_match(tmp_path):
    """An untied LM whose vocabulary grew: OpenFlamingo's head rows for its new tokens were a
    random initialisation it never saved. The report says so; every other logit is exact."""
    paths = make_world(str(tmp_path), "llama", tie=False, keep_pad=False)
    reference, tokenizer = openflamingo_checkpoint(paths, every=4)
    report = convert_openflamingo(paths["checkpoint"], paths["lm"], paths["clip"], paths["out"])
    assert "output head rows 300..302" in str(report) and "cannot be recovered" in str(report)
    with open(os.path.join(paths["out"], "conversion_report.txt")) as f:
        assert "cannot be recovered" in f.read()
    batch = encode(FlamingoProcessor.from_pretrained(paths["out"]))
    with torch.no_grad():
        ours = FlamingoModel.from_pretrained(paths["out"])(**batch).logits
        ref = reference(vision_x=openflamingo_pixels(batch), lang_x=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert (ours - ref).abs()[real][:, :300].max() <= 1e-5
    # Columns 300..302 are not compared: OpenFlamingo's rows there are whatever its
    # transformers' resize drew (normal noise under 4.x, about the mean row under 5.x).


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch, capsys):
    """A checkpoint whose unpickling executes code is refused, naming the file; nothing runs."""
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "checkpoint.pt")
    torch.save({"perceiver.latents": torch.zeros(2, 2), "x": _RunsCode()}, path)
    with pytest.raises(ConversionError, match="checkpoint.pt: refused"):
        load_checkpoint(path)
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(["openflamingo", "--checkpoint", path, "--lm", str(tmp_path),
                          "--vision", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    assert not (tmp_path / "out").exists()
    # The file does run code when unpickled without weights_only: the refusal prevented it.
    torch.load(path, weights_only=False)
    assert (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_training_checkpoint_and_bad_inputs(conversions, tmp_path):
    """A training checkpoint (model_state_dict, DDP prefixes) reads like the released one;
    unexpected keys, a wrong --cross-attn-every, a hub name or a foreign LM fail, naming what
    is wrong."""
    *_, paths = conversions("llama")
    flat = load_checkpoint(paths["checkpoint"])
    wrapped = str(tmp_path / "checkpoint_3.pt")
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in flat.items()},
                "optimizer_state_dict": {}}, wrapped)
    assert set(load_checkpoint(wrapped)) == set(flat)

    extra = str(tmp_path / "extra.pt")
    torch.save({**flat, "vision_encoder.conv1.weight": torch.zeros(1)}, extra)
    with pytest.raises(ConversionError, match=r"unexpected keys \['vision_encoder.conv1.weight'\]"):
        convert_openflamingo(extra, paths["lm"], paths["clip"], tmp_path / "o1")
    with pytest.raises(ConversionError, match="--cross-attn-every 4, but the checkpoint has "
                                              r"cross-attention before layers \[1, 3\]"):
        convert_openflamingo(paths["checkpoint"], paths["lm"], paths["clip"], tmp_path / "o2",
                             cross_attn_every=4)
    with pytest.raises(FileNotFoundError, match="--lm: 'gpt2' is not a local directory"):
        convert_openflamingo(paths["checkpoint"], "gpt2", paths["clip"], tmp_path / "o0")
    other = make_world(str(tmp_path / "other"), "llama", extra_rows=5)
    with pytest.raises(ConversionError, match="rows but the tokenizer"):
        convert_openflamingo(paths["checkpoint"], other["lm"], paths["clip"], tmp_path / "o3")


def test_converted_model_evaluates_and_continues_training(
    conversions, world, single_process, tmp_path  # noqa: F811
):
    """flamingo-eval runs on a converted model, and the flamingo stage continues its training
    (flamingo.init_from) for a step: the exported model keeps the architecture, trained on."""
    *_, paths = conversions("llama")
    data = write_toy_eval_sets(str(tmp_path / "toy"))
    assert eval_cli.main(["--model", paths["out"], "--task", "synth_vqa", "--data", data,
                          "--shots", "0,1", "--trials", "1", "--limit", "2", "--num-beams", "1",
                          "--max-new-tokens", "3", "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "synth_vqa.json").read_text())
    assert [len(r["trials"][0]["predictions"]) for r in results["results"]] == [2, 2]

    new_model = ("flamingo.model=", "flamingo.lm=", "flamingo.vision=")
    overrides = (common_overrides(str(tmp_path / "run"), 1)
                 + [o for o in stage_overrides(world, "flamingo") if not o.startswith(new_model)]
                 + [f"flamingo.init_from={paths['out']}"])
    final = run(load_config(None, overrides))
    before = FlamingoModel.from_pretrained(paths["out"])
    after = FlamingoModel.from_pretrained(final)
    skip = ("lm_source", "vision_source")
    assert ({k: v for k, v in after.config.to_dict().items() if k not in skip}
            == {k: v for k, v in before.config.to_dict().items() if k not in skip})
    assert not torch.equal(after.perceiver.latents, before.perceiver.latents)
    assert FlamingoProcessor.from_pretrained(final).image_token_id == before.image_token_id
