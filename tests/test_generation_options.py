"""transformers' generation options inside our cached decoding loop, checked against transformers.

References, on a model whose every parameter is random (``randomize_all``):

- transformers' own ``generate`` driving our *uncached* forward (``tests/hf_reference.py``), on
  prompts with images, for the whole prompt; our cached ``generate`` must give the same tokens
  (greedy, beams; sampling with the same global seed) for the whole prompt and for a cached
  prefix plus the queries, and the same scores;
- transformers' ``generate`` of the bare LM with its own KV cache (gates closed, text only);
- transformers' ``_get_logits_processor`` / ``_get_stopping_criteria``: same classes, order and
  settings as the lists we build.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MaxLengthCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)
from transformers.generation import (
    GenerateBeamDecoderOnlyOutput,
    GenerateDecoderOnlyOutput,
    LogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    StoppingCriteria,
    SuppressTokensLogitsProcessor,
)

from flamingo_kit import from_scratch
from flamingo_kit.generation_options import build_criteria, build_processors, resolve_config
from tests.conftest import build_model, randomize_all
from tests.hf_reference import HFGenerateReference, new_tokens
from tests.test_generation_exact import IMG, QUERIES, TEXT_PROMPTS, chunk, ids_of, left_pad, pixels

PAD = 3


@pytest.fixture(scope="module")
def setup(tokenizer):
    """A random model, its transformers reference, and prompts whole or after a 2-shot prefix."""
    model = randomize_all(build_model("llama", processor=tokenizer), 1).eval()
    with torch.no_grad():  # <|endofchunk|> likely enough that rows stop at different steps
        model.media_tokens.head.bias[1] = 2.0
    queries = [ids_of(tokenizer, model, q) for q in QUERIES]
    query_images = [[100 + 10 * i + j for j in range(q.count(IMG))] for i, q in enumerate(QUERIES)]
    prefix = ids_of(tokenizer, model, chunk(0) + chunk(1), bos=True)
    state = model.prefill(torch.tensor([prefix]), pixel_values=pixels([[0, 1]]))
    whole_ids, whole_mask = left_pad([prefix + q for q in queries], pad=PAD)
    q_ids, q_mask = left_pad(queries, pad=PAD)
    whole = dict(input_ids=whole_ids, attention_mask=whole_mask,
                 pixel_values=pixels([[0, 1] + imgs for imgs in query_images]))
    after = dict(input_ids=q_ids, attention_mask=q_mask, pixel_values=pixels(query_images),
                 prefix=state)
    base = dict(max_new_tokens=10, eos_token_id=[model.eoc_token_id, 2], pad_token_id=PAD)
    return dict(model=model, reference=HFGenerateReference(model), whole=whole, after=after,
                base=base, tokenizer=tokenizer)


def run_all(setup, **options):
    """Ours on the whole prompt, ours after the prefix, transformers' reference (same seed)."""
    kwargs = {**setup["base"], **options}
    torch.manual_seed(0)
    ours = setup["model"].generate(**setup["whole"], **kwargs)
    torch.manual_seed(0)
    after_prefix = setup["model"].generate(**setup["after"], **kwargs)
    torch.manual_seed(0)
    theirs = setup["reference"].reference_generate(**setup["whole"], **kwargs)
    return ours, after_prefix, new_tokens(theirs, setup["whole"]["input_ids"].shape[1])


GREEDY, BEAMS, SAMPLE = dict(), dict(num_beams=3), dict(do_sample=True)
CASES = {  # strategy, options that must change its output
    "greedy": (GREEDY, {}),
    "greedy repetition_penalty": (GREEDY, dict(repetition_penalty=1.5)),
    "greedy no_repeat_ngram_size": (GREEDY, dict(no_repeat_ngram_size=2)),
    "greedy min_new_tokens": (GREEDY, dict(min_new_tokens=6)),
    "greedy bad_words_ids": (GREEDY, dict(bad_words_ids=[[5], [105, 197]])),
    "greedy sequence_bias, suppress_tokens": (GREEDY, dict(sequence_bias={(5, 5): -9.0},
                                                           suppress_tokens=[154])),
    "greedy max_length (whole prompt + new)": (GREEDY, dict(max_new_tokens=None, max_length=92)),
    "greedy exponential_decay_length_penalty": (GREEDY, dict(
        exponential_decay_length_penalty=(2, 3.0))),
    "beams": (BEAMS, {}),
    "beams repetition_penalty, no_repeat_ngram_size": (BEAMS, dict(repetition_penalty=1.3,
                                                                   no_repeat_ngram_size=3)),
    "beams min_new_tokens, bad_words_ids": (BEAMS, dict(min_new_tokens=4, bad_words_ids=[[5]])),
    "beams num_return_sequences": (BEAMS, dict(num_return_sequences=3)),
    "beams length_penalty, early_stopping": (BEAMS, dict(length_penalty=-1.0,
                                                         early_stopping=True)),
    "sampling": (SAMPLE, {}),
    "sampling temperature, top_k, top_p": (SAMPLE, dict(temperature=0.7, top_k=20, top_p=0.9)),
    "sampling num_return_sequences, repetition_penalty": (SAMPLE, dict(
        num_return_sequences=3, repetition_penalty=1.3)),
    "sampling min_p, typical_p": (SAMPLE, dict(min_p=0.05, typical_p=0.9)),
    "beam sampling": (dict(num_beams=2, do_sample=True), dict(top_k=30)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_options_equal_transformers_generate_with_images_and_after_a_prefix(setup, case):
    strategy, options = CASES[case]
    ours, after_prefix, theirs = run_all(setup, **strategy, **options)
    assert ours.tolist() == theirs.tolist()
    assert after_prefix.tolist() == theirs.tolist()
    if not options:  # rows end at different steps (or not at all): finishing is exercised
        stops = {setup["model"].eoc_token_id, 2}
        ended = {next((i for i, t in enumerate(row) if t in stops), None) for row in ours.tolist()}
        assert len(ended) > 1, ours
    if options and not ("num_return_sequences" in options and strategy is SAMPLE):
        plain, _, _ = run_all(setup, **strategy)
        plain = plain.repeat_interleave(ours.shape[0] // plain.shape[0], 0)
        assert ours.tolist() != plain.tolist()  # the options matter here


@pytest.mark.parametrize("strategy", [GREEDY, BEAMS, SAMPLE], ids=["greedy", "beams", "sampling"])
def test_scores_and_output_object_equal_transformers(setup, strategy):
    options = dict(return_dict_in_generate=True, output_scores=True, output_logits=True,
                   repetition_penalty=1.2, return_prompt=True, **strategy)
    kwargs = {**setup["base"], **options}
    torch.manual_seed(0)
    ours = setup["model"].generate(**setup["after"], **kwargs)
    kwargs.pop("return_prompt")
    torch.manual_seed(0)
    theirs = setup["reference"].reference_generate(**setup["whole"], **kwargs)
    assert type(ours) is type(theirs)
    assert isinstance(ours, GenerateBeamDecoderOnlyOutput if strategy is BEAMS
                      else GenerateDecoderOnlyOutput)
    width = setup["whole"]["input_ids"].shape[1]
    assert torch.equal(ours.sequences[:, setup["after"]["input_ids"].shape[1]:],
                       theirs.sequences[:, width:])
    assert len(ours.scores) == len(theirs.scores) == len(ours.logits)
    for mine, ref in zip(ours.scores + ours.logits, theirs.scores + theirs.logits):
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(mine), finite)
        assert torch.allclose(mine[finite], ref[finite], atol=1e-4, rtol=1e-4)
    if strategy is BEAMS:
        assert torch.equal(ours.beam_indices, theirs.beam_indices)
        assert torch.allclose(ours.sequences_scores, theirs.sequences_scores, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("options", [
    dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
    dict(num_beams=3, num_return_sequences=2, min_new_tokens=5, repetition_penalty=1.3),
    dict(num_beams=2, bad_words_ids=[[5], [7, 8]], no_repeat_ngram_size=3, length_penalty=0.0),
], ids=["greedy", "beams", "beams-bad-words"])
def test_text_only_options_equal_the_bare_lm_generate(tokenizer, family, options):
    """Gates closed, text only: the bare LM's own cached ``generate`` is the reference."""
    model = build_model(family, processor=tokenizer).eval()
    reference = from_scratch.build_lm(family, seed=0, vocab_size=300).eval()
    with torch.no_grad():  # <|endofchunk|> has no counterpart in the bare LM
        model.media_tokens.head.bias[1] = -1e9
    ids, mask = left_pad([ids_of(tokenizer, model, [p], bos=True) for p in TEXT_PROMPTS], pad=PAD)
    kwargs = dict(max_new_tokens=10, eos_token_id=[2, 5], pad_token_id=PAD, **options)
    ours = model.generate(ids, mask, **kwargs)
    theirs = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kwargs)
    assert ours.tolist() == theirs[:, ids.shape[1]:].tolist()


class Halve(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores / 2


class Never(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("do_sample", [False, True])
def test_processors_and_criteria_are_transformers_own_in_its_order(tokenizer, do_sample):
    lm = from_scratch.build_lm("llama", seed=0, vocab_size=300)
    options = dict(
        max_new_tokens=7, min_new_tokens=2, repetition_penalty=1.2, no_repeat_ngram_size=2,
        bad_words_ids=[[4], [5, 6]], sequence_bias={(9,): 1.5}, forced_bos_token_id=1,
        forced_eos_token_id=2, remove_invalid_values=True, exponential_decay_length_penalty=(3, 1.1),
        suppress_tokens=[11], begin_suppress_tokens=[12], renormalize_logits=True,
        do_sample=do_sample, temperature=0.8, top_k=7, top_p=0.9, min_p=0.1, typical_p=0.95,
        epsilon_cutoff=0.001, eta_cutoff=0.001, top_h=0.5, num_beams=2, max_time=100.0,
        stop_strings=["red"], eos_token_id=[2, 301], pad_token_id=0)
    config, _ = resolve_config(None, options)
    prompt_len, eos = 9, torch.tensor([2, 301])
    config.max_length, config.min_length = prompt_len + 7, prompt_len + 2
    config._eos_token_tensor = eos
    padding = torch.tensor([0, 2, 3, 0])
    custom = LogitsProcessorList([NoRepeatNGramLogitsProcessor(3), Halve(),
                                  SuppressTokensLogitsProcessor([13])])
    with pytest.warns(UserWarning) as replaced:
        ours = build_processors(config, prompt_len, padding, eos, custom)
    assert [str(w.message).split()[1] for w in replaced] == [
        "NoRepeatNGramLogitsProcessor", "SuppressTokensLogitsProcessor"]
    theirs = lm._get_logits_processor(
        config, input_ids_seq_length=prompt_len, logits_processor=custom, device="cpu",
        model_kwargs={"attention_mask": (torch.arange(prompt_len)[None] >= padding[:, None]).long()})
    assert [type(p) for p in ours] == [type(p) for p in theirs]
    assert len(ours) == (22 if do_sample else 14)
    assert type(ours[12]) is Halve  # a new custom processor: after the built ones, before warpers
    assert [describe(p) for p in ours] == [describe(p) for p in theirs]
    assert ours[2] is custom[0]  # a custom processor replaces the built one of its class

    criteria = StoppingCriteriaList([MaxLengthCriteria(12), Never()])
    with pytest.warns(UserWarning, match="MaxLengthCriteria passed to generate replaces"):
        ours = build_criteria(config, lm.config.max_position_embeddings, eos, criteria, tokenizer)
    theirs = lm._get_stopping_criteria(config, criteria, tokenizer=tokenizer)
    assert [type(c) for c in ours] == [type(c) for c in theirs]
    assert [describe(c) for c in ours if type(c).__name__ != "MaxTimeCriteria"] == \
        [describe(c) for c in theirs if type(c).__name__ != "MaxTimeCriteria"]


def describe(obj) -> dict:
    """A processor's or criterion's settings, comparable (tensors as lists)."""
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v)
            for k, v in vars(obj).items() if k not in ("tokenizer",)}


# -- stop strings, streamers, shapes, refused options ---------------------------------------

def test_stop_strings_end_rows_like_transformers(setup):
    model, tokenizer = setup["model"], setup["tokenizer"]
    # Without byte tokens this random model writes text that stop strings can match.
    text_only = dict(suppress_tokens=[0, *range(3, 259)])
    plain = model.generate(**setup["whole"], **setup["base"], **text_only)
    texts = [tokenizer.decode([t for t in row if t != PAD], skip_special_tokens=True)
             for row in plain.tolist()]
    stop = texts[2][3:6]  # a string inside row 2's answer
    ours, after_prefix, theirs = run_all(setup, stop_strings=[stop, "zzz"], tokenizer=tokenizer,
                                         **text_only)
    assert ours.tolist() == theirs.tolist() == after_prefix.tolist()
    cut = 0
    for row, text in zip(ours.tolist(), texts):
        row = [t for t in row if t != PAD]
        if stop in text:  # stopped at the first token that completes the stop string
            assert stop in tokenizer.decode(row, skip_special_tokens=True)
            assert stop not in tokenizer.decode(row[:-1], skip_special_tokens=True)
            cut += 1
        else:
            assert tokenizer.decode(row, skip_special_tokens=True) == text
    assert cut >= 1 and ours.tolist() != plain.tolist()
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        model.generate(**setup["whole"], stop_strings=[stop])


def single(setup):
    """Query 1 after the prefix, and the same query as a whole prompt."""
    after = {k: (v[1:2] if isinstance(v, torch.Tensor) else v) for k, v in setup["after"].items()}
    whole = {k: v[1:2] for k, v in setup["whole"].items()}
    n_pad = int((whole["attention_mask"][0] == 0).sum())
    whole = {k: (v[:, n_pad:] if k != "pixel_values" else v) for k, v in whole.items()}
    after = {k: (v[:, int((after["attention_mask"][0] == 0).sum()):]
                 if k in ("input_ids", "attention_mask") else v) for k, v in after.items()}
    return whole, after


def test_text_streamer_prints_the_new_text(setup, capsys):
    model, tokenizer = setup["model"], setup["tokenizer"]
    whole, after = single(setup)
    kwargs = dict(max_new_tokens=12, repetition_penalty=1.3)
    new = model.generate(**after, **kwargs)
    expected = tokenizer.decode(new[0], skip_special_tokens=True)
    capsys.readouterr()
    streamed = model.generate(**after, streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                             skip_special_tokens=True), **kwargs)
    assert torch.equal(streamed, new)
    assert capsys.readouterr().out == expected + "\n"
    # Without skip_prompt the whole prompt comes first: the prefix's text, then the query's.
    model.generate(**after, streamer=TextStreamer(tokenizer), **kwargs)
    prompt_and_new = torch.cat([whole["input_ids"][0], new[0]])
    assert capsys.readouterr().out == tokenizer.decode(prompt_and_new) + "\n"


def test_text_iterator_streamer_yields_the_new_text(setup):
    model, tokenizer = setup["model"], setup["tokenizer"]
    whole, _ = single(setup)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=60)
    kwargs = dict(**whole, max_new_tokens=12, no_repeat_ngram_size=2)
    result = {}
    thread = threading.Thread(target=lambda: result.update(new=model.generate(streamer=streamer,
                                                                              **kwargs)))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(pieces) > 1
    assert "".join(pieces) == tokenizer.decode(result["new"][0], skip_special_tokens=True)


def test_streamer_needs_one_row_and_no_beams(setup):
    model, tokenizer = setup["model"], setup["tokenizer"]
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(**setup["whole"], streamer=TextStreamer(tokenizer))
    whole, _ = single(setup)
    with pytest.raises(ValueError, match="streamer cannot be used with beam search"):
        model.generate(**whole, num_beams=2, streamer=TextStreamer(tokenizer))


def test_num_return_sequences_shapes(setup):
    model, b = setup["model"], setup["whole"]["input_ids"].shape[0]
    sampled = model.generate(**setup["after"], do_sample=True, num_return_sequences=3, seed=1,
                             max_new_tokens=6)
    assert sampled.shape[0] == 3 * b and sampled.shape[1] <= 6
    assert not torch.equal(sampled[0], sampled[1])  # draws of the same prompt differ
    with_prompt = model.generate(**setup["after"], do_sample=True, num_return_sequences=3,
                                 seed=1, max_new_tokens=6, return_prompt=True)
    assert torch.equal(with_prompt[:, :setup["after"]["input_ids"].shape[1]],
                       setup["after"]["input_ids"].repeat_interleave(3, 0))
    assert torch.equal(with_prompt[:, setup["after"]["input_ids"].shape[1]:], sampled)
    beams = model.generate(**setup["whole"], num_beams=3, num_return_sequences=2)
    best = model.generate(**setup["whole"], num_beams=3)
    assert beams.shape[0] == 2 * b
    assert beams[::2, :best.shape[1]].tolist() == best.tolist()  # the first of each is the best
    out = model.generate(**setup["whole"], num_beams=3, num_return_sequences=2,
                         return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == beams.shape and out.sequences_scores.shape == (2 * b,)
    assert out.beam_indices.shape == beams.shape
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(**setup["whole"], num_return_sequences=2)  # greedy: all identical
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(**setup["whole"], num_beams=2, num_return_sequences=3)


@pytest.mark.parametrize("options, named", [
    (dict(guidance_scale=1.5), "guidance_scale=1.5"),
    (dict(use_cache=False), "use_cache=False"),
    (dict(output_attentions=True), "output_attentions=True"),
    (dict(generation_config=GenerationConfig(penalty_alpha=0.6, top_k=4)), "penalty_alpha=0.6"),
    (dict(generation_config=GenerationConfig(cache_implementation="static")),
     "cache_implementation='static'"),
    (dict(encoder_repetition_penalty=1.2, token_healing=True),
     "encoder_repetition_penalty=1.2, token_healing=True"),
])
def test_options_it_cannot_honour_raise_naming_them(setup, options, named):
    with pytest.raises(ValueError, match="cannot honour " + named.replace("(", r"\(")):
        setup["model"].generate(**setup["whole"], **options)


@pytest.mark.parametrize("options, message", [
    (dict(num_beams=0), "num_beams must be an integer >= 1, got 0"),
    (dict(num_return_sequences=0, do_sample=True), "num_return_sequences must be an integer"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(max_length=5), r"prompt has 86 tokens \(cached prefix included\) but max_length is 5"),
])
def test_bad_values_raise_naming_them(setup, options, message):
    with pytest.raises(ValueError, match=message):
        setup["model"].generate(**setup["whole"], **options)


def test_unknown_keyword_arguments_raise_naming_them(setup):
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['max_new_token'\]"):
        setup["model"].generate(**setup["whole"], max_new_token=5)
    with pytest.raises(TypeError, match="generation_config must be"):
        setup["model"].generate(**setup["whole"], generation_config={"num_beams": 2})


def test_defaults_off_and_lm_generation_config_does_not_apply(setup):
    """Options left at their defaults are accepted; the LM's own generation_config is ignored."""
    model = setup["model"]
    expected = model.generate(**setup["whole"])
    assert expected.shape[1] == 20  # transformers' default: 20 new tokens
    harmless = GenerationConfig(output_attentions=False, use_cache=True, num_beam_groups=1,
                                bos_token_id=1, max_length=20 + setup["whole"]["input_ids"].shape[1])
    assert torch.equal(model.generate(**setup["whole"], generation_config=harmless), expected)
    saved = model.lm.generation_config
    model.lm.generation_config = GenerationConfig(do_sample=True, temperature=5.0, top_k=0,
                                                  max_new_tokens=3, repetition_penalty=2.0)
    try:
        for seed in (0, 1):
            torch.manual_seed(seed)
            assert torch.equal(model.generate(**setup["whole"]), expected)
    finally:
        model.lm.generation_config = saved
    # Opting in: the LM's config passed explicitly applies.
    opt_in = model.generate(**setup["whole"], generation_config=GenerationConfig(
        do_sample=True, temperature=5.0, top_k=0, max_new_tokens=3), seed=0)
    assert opt_in.shape[1] <= 3 and not torch.equal(opt_in, expected[:, :opt_in.shape[1]])
