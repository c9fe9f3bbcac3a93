"""Model core: zero-gate identity, locality of cross-attention, training signal, save/load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from flamingo_kit import FlamingoModel
from flamingo_kit.cross_attention import MediaLayout, cross_attend
from flamingo_kit.from_scratch import (
    LM_FAMILIES,
    TINY_FLAMINGO,
    build_lm,
    build_vision,
    open_gates,
)
from flamingo_kit.lm_integration import find_decoder_layers
from flamingo_kit.media import media_state
from tests.conftest import build_model, randomize_all

IMG = 300  # <image> id of the test tokenizer / tiny models


def ids_with_images(positions, length=16, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 290, (batch, length), generator=gen)
    for p in positions:
        ids[:, p] = IMG
    return ids


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_zero_gates_equal_the_frozen_lm(family):
    model = build_model(family).train().eval()  # also finds its own, now wrapped, blocks
    bare = build_lm(family, vocab_size=300)
    text = torch.randint(3, 290, (2, 12))
    with torch.no_grad():
        ours = model(input_ids=text, attention_mask=torch.ones_like(text)).logits
        ref = bare(input_ids=text).logits
    assert ours.shape[-1] == 302  # vocabulary + <image> + <|endofchunk|>
    assert (ours[..., :300] - ref).abs().max() <= 1e-5

    ids = ids_with_images([2, 9])
    images = torch.randn(2, 2, 1, 3, 32, 32)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=images).logits
        b = model(input_ids=ids, pixel_values=torch.randn_like(images)).logits
    assert torch.equal(a, b)


def test_no_module_carries_a_hook():
    """Nothing runs behind the LM's back: no module of the model holds a forward hook, and
    calling the LM on its own gives its own logits (the media tokens live in ``forward``)."""
    model = build_model("gpt2", lora={"r": 4})
    assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())
    text = torch.randint(3, 290, (1, 8))
    with torch.no_grad():
        assert model.lm(input_ids=text).logits.shape[-1] == 300


def _lm_of(family: str, seed: int = 0, **config):
    """A tiny LM of a family ``from_scratch.lm_config`` does not cover (eager attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128)
    lm_config = AutoConfig.for_model(family, **{**shape, **config})
    lm_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(lm_config).eval()


def test_soft_capped_lm_keeps_its_own_logits():
    """Gemma 2 soft-caps its logits in its causal-LM class: ours are capped the same way."""
    from flamingo_kit import FlamingoConfig

    cap = 0.05  # far below the logits' scale, so a missing cap shows
    model = FlamingoModel.from_parts(_lm_of("gemma2", final_logit_softcapping=cap),
                                     build_vision(), FlamingoConfig(**TINY_FLAMINGO)).eval()
    bare = _lm_of("gemma2", final_logit_softcapping=cap)
    text = torch.randint(3, 290, (2, 12))
    with torch.no_grad():
        ours = model(input_ids=text).logits
        ref = bare(input_ids=text).logits
    assert (ours[..., :300] - ref).abs().max() <= 1e-6
    assert ours[..., 300:].abs().max() <= cap  # the media tokens' logits are capped too


# Causal-LM classes that rescale around their head, with a scale far from 1 so a missing or
# misplaced rescale shows (MiniCPM3 divides the hidden states by hidden_size / dim_model_base).
RESCALING_LMS = [
    ("cohere", {"logit_scale": 0.25}),
    ("cohere2", {"logit_scale": 0.25}),
    ("granite", {"logits_scaling": 8.0}),
    ("granitemoe", {"logits_scaling": 8.0}),
    ("granitemoeshared", {"logits_scaling": 8.0}),
    ("hyperclovax", {"logits_scaling": 0.25}),
    ("minicpm3", {"dim_model_base": 8, "num_key_value_heads": 4}),
    ("falcon_h1", {"lm_head_multiplier": 0.25}),
]


@pytest.mark.parametrize("family, scaling", RESCALING_LMS, ids=[f for f, _ in RESCALING_LMS])
def test_lm_that_rescales_its_logits_keeps_its_own_logits(family, scaling):
    """A fresh model whose LM's causal-LM class rescales around its head gives exactly that LM's
    logits, and the media tokens' logits are rescaled alike: they equal those of the same LM
    whose head holds the media tokens' (randomised) rows."""
    from flamingo_kit import FlamingoConfig

    model = FlamingoModel.from_parts(_lm_of(family, **scaling), build_vision(),
                                     FlamingoConfig(**TINY_FLAMINGO)).eval()
    rows = model.media_tokens.head
    with torch.no_grad():
        rows.weight.copy_(torch.randn_like(rows.weight))
        rows.bias.copy_(torch.randn_like(rows.bias))
    bare = _lm_of(family, **scaling)
    text = torch.randint(3, 290, (2, 12))
    with torch.no_grad():
        ours = model(input_ids=text).logits
        ref = bare(input_ids=text).logits
        head = bare.get_output_embeddings()
        extended = torch.nn.Linear(head.in_features, 302)
        extended.weight.copy_(torch.cat([head.weight, rows.weight]))
        extended.bias.copy_(torch.cat([torch.zeros(300), rows.bias]))
        bare.set_output_embeddings(extended)
        ref_media = bare(input_ids=text).logits[..., 300:]
    unscaled = {k: v for k, v in scaling.items() if k == "num_key_value_heads"}
    assert not torch.equal(ref, _lm_of(family, **unscaled)(input_ids=text).logits)  # it matters
    assert torch.equal(ours[..., :300], ref)
    assert (ours[..., 300:] - ref_media).abs().max() <= 1e-5


@pytest.mark.parametrize("family, setting", [
    ("recurrent_gemma", "logits_soft_cap"),  # its body returns no KV cache to decode with
    ("falcon_h1", "embedding_multiplier"),  # applied only to token ids, not to embeddings
])
def test_lm_with_an_unverified_rescaling_is_refused(family, setting):
    """A rescaling flamingo-kit does not reproduce (and test) is refused, naming the setting."""
    from flamingo_kit import FlamingoConfig

    lm = _lm_of(family, **{setting: 2.0})
    with pytest.raises(ValueError, match=rf"{type(lm).__name__} .*\({setting}=2.0"):
        FlamingoModel.from_parts(lm, build_vision(), FlamingoConfig())


@pytest.mark.parametrize("policy", ["immediate", "all_previous"])
def test_changing_an_image_only_affects_later_tokens(policy):
    model = build_model("llama", media_policy=policy)
    open_gates(model)
    ids = ids_with_images([1, 6, 11], length=16)
    images = torch.randn(2, 3, 1, 3, 32, 32)
    with torch.no_grad():
        base = model(input_ids=ids, pixel_values=images).logits
        for j, pos in enumerate([1, 6, 11]):
            changed = images.clone()
            changed[:, j] = torch.randn_like(changed[:, j])
            logits = model(input_ids=ids, pixel_values=changed).logits
            assert torch.allclose(logits[:, :pos], base[:, :pos], atol=1e-6, rtol=0)
            assert (logits[:, pos:] - base[:, pos:]).abs().max() > 1e-4


def test_text_before_first_image_gets_exactly_zero():
    model = build_model("llama")
    open_gates(model)
    ids = ids_with_images([5])
    layer = next(layer for layer in find_decoder_layers(model.lm) if hasattr(layer, "xattn"))
    hidden = torch.randn(2, 16, 64)
    media = media_state(model, ids, torch.randn(2, 1, 1, 3, 32, 32))
    out = layer.xattn(hidden, media.media_kv(0, layer.xattn), media.layout)
    assert torch.equal(out[:, :5], hidden[:, :5])
    assert not torch.equal(out[:, 5:], hidden[:, 5:])


@pytest.mark.parametrize("policy", ["immediate", "all_previous"])
def test_cross_attention_runs_only_on_tokens_that_see_an_image(policy):
    """Text before the first image and padding cost nothing in the blocks: only the tokens
    that see an image are gathered into them; the rest of the outputs are unchanged."""
    model = randomize_all(build_model("llama", media_policy=policy))
    ids = ids_with_images([4, 9], length=16)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding
    rows = []
    model.lm.model.layers[0].xattn.to_q.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[0]))
    pixels = torch.randn(2, 2, 1, 3, 32, 32)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        alone = model(input_ids=ids[1:, :12], pixel_values=pixels[1:]).logits
    assert rows == [(16 - 4) + (12 - 4), 12 - 4]
    assert torch.allclose(logits[1, :12], alone[0], atol=1e-5)  # the padded row's real tokens


@pytest.mark.parametrize("policy", ["immediate", "all_previous"])
def test_attention_inputs_follow_the_media_policy(policy):
    # Three images at tokens 2, 7, 12; perturb the keys/values of image 0 only.
    ids = ids_with_images([2, 7, 12], length=16, batch=1)
    layout = MediaLayout.build(ids, IMG, 3, policy)
    assert layout.media_index[0].tolist() == [-1, -1] + [0] * 5 + [1] * 5 + [2] * 4
    q = torch.randn(1, 16, 2, 8)
    k, v = torch.randn(1, 3, 2, 4, 8), torch.randn(1, 3, 2, 4, 8)
    base = cross_attend(q, k, v, layout)
    k2, v2 = k.clone(), v.clone()
    k2[:, 0], v2[:, 0] = torch.randn_like(k2[:, 0]), torch.randn_like(v2[:, 0])
    out = cross_attend(q, k2, v2, layout)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    assert not torch.allclose(out[:, 2:7], base[:, 2:7])  # tokens that see image 0
    after = torch.allclose(out[:, 7:], base[:, 7:], atol=1e-6)
    # immediate: tokens after image 1 see only image 1 (or 2); all_previous: image 0 too.
    assert after == (policy == "immediate")


@pytest.mark.parametrize("policy", ["immediate", "all_previous"])
def test_decoding_layout_attends_as_the_whole_input_does(policy):
    """A new token after a prompt attends, through ``for_decoding`` and the K/V it keeps, exactly
    as it would at the end of the whole input (rows with none, one and several images)."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 290, (3, 12), generator=gen)
    prompt[1, [2, 7]] = IMG
    prompt[2, 0] = IMG
    whole = torch.cat([prompt, torch.full((3, 1), 5)], dim=1)
    q = torch.randn(3, 13, 2, 8, generator=gen)
    k, v = torch.randn(3, 2, 2, 4, 8, generator=gen), torch.randn(3, 2, 2, 4, 8, generator=gen)
    expected = cross_attend(q, k, v, MediaLayout.build(whole, IMG, 2, policy))[:, -1:]

    layout, kept = MediaLayout.build(prompt, IMG, 2, policy).for_decoding()
    if kept is not None:  # immediate: each row keeps its latest image's keys/values only
        rows = torch.arange(3)
        k, v = k[rows, kept].unsqueeze(1), v[rows, kept].unsqueeze(1)
    got = cross_attend(q[:, -1:], k, v, layout)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got[0].abs().max() == 0 and got[1:].abs().min() > 0


@pytest.mark.parametrize("policy", ["immediate", "all_previous"])
def test_repeated_layout_is_the_layout_of_repeated_rows(policy):
    """Beams: ``repeated(k)`` equals the layout built from each row repeated k times."""
    ids = ids_with_images([2, 9], length=12, batch=2)
    ids[1, 9] = 7  # the second row holds one image
    got = MediaLayout.build(ids, IMG, 2, policy).repeated(3)
    expected = MediaLayout.build(ids.repeat_interleave(3, 0), IMG, 2, policy)
    assert torch.equal(got.media_index, expected.media_index)
    q, k, v = torch.randn(6, 12, 2, 8), torch.randn(6, 2, 2, 4, 8), torch.randn(6, 2, 2, 4, 8)
    assert torch.equal(cross_attend(q, k, v, got), cross_attend(q, k, v, expected))


@pytest.mark.parametrize("layout_kind", ["uneven", "balanced"])
def test_chunked_attention_matches_a_dense_masked_reference(layout_kind):
    torch.manual_seed(0)
    ids = torch.randint(3, 290, (3, 40))
    rows = {"uneven": [[0, 3, 30], [10], [5, 6, 7, 20, 39]],
            "balanced": [[0, 10, 20, 30], [2, 12, 22, 32], [5, 15, 25, 35]]}[layout_kind]
    for row, positions in enumerate(rows):
        ids[row, positions] = IMG
    layout = MediaLayout.build(ids, IMG, 5, "immediate")
    assert layout.plan.one_chunk_per_image == (layout_kind == "balanced")
    q, k, v = torch.randn(3, 40, 2, 8), torch.randn(3, 5, 2, 4, 8), torch.randn(3, 5, 2, 4, 8)
    out = cross_attend(q, k, v, layout)
    index = layout.media_index
    for b in range(3):
        for t in range(40):
            n = int(index[b, t])
            if n < 0:
                assert torch.equal(out[b, t], torch.zeros_like(out[b, t]))
                continue
            scores = torch.einsum("hd,hld->hl", q[b, t], k[b, n]) / 8**0.5
            ref = torch.einsum("hl,hld->hd", scores.softmax(-1), v[b, n])
            assert torch.allclose(out[b, t], ref, atol=1e-5)


def test_one_step_changes_only_trainable_parameters():
    model = build_model("llama")
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable
    assert all(n.startswith(("lm.", "vision.")) for n in frozen)
    assert not any(".xattn." in n for n in frozen)
    ids = ids_with_images([1, 8], length=16)
    ids[:, 6] = 301  # <|endofchunk|>
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):  # step 1 opens the gates; step 2 sends gradient everywhere
        optimizer.zero_grad()
        loss = model(input_ids=ids, pixel_values=torch.randn(2, 2, 1, 3, 32, 32), labels=ids).loss
        loss.backward()
        missing = [n for n, p in trainable.items() if p.grad is None]
        assert not missing, f"no gradient for {missing}"
        optimizer.step()
    zero = [n for n, p in trainable.items() if not p.grad.abs().sum() > 0]
    assert not zero, f"zero gradient after the gates opened: {zero}"
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_padding_images_are_never_encoded():
    model = build_model("llama")
    seen = []
    ids = ids_with_images([], length=10)
    ids[0, [2, 5]] = IMG
    ids[1, 3] = IMG
    pixels = torch.randn(2, 3, 1, 3, 32, 32)  # 6 slots, 3 real images
    model.vision.tower.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    model(input_ids=ids, pixel_values=pixels)
    assert seen == [3]


def roundtrip(model, tmp_path):
    ids = ids_with_images([2, 9])
    images = torch.randn(2, 2, 1, 3, 32, 32)
    model.save_pretrained(tmp_path)
    loaded = FlamingoModel.from_pretrained(tmp_path)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=images).logits, loaded(
            input_ids=ids, pixel_values=images
        ).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_load_gives_identical_logits(family, tmp_path):
    model = build_model(family)
    open_gates(model, 0.5)
    a, b = roundtrip(model, tmp_path)
    assert torch.equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "lm", "model.safetensors", "vision",
    ]


def test_patch_mlp_feeds_the_resampler_and_round_trips(tmp_path):
    """perceiver_patch_ff_mult>0: a per-patch MLP changes what the latents see; saved exactly."""
    model = build_model("llama", perceiver_patch_ff_mult=2)
    open_gates(model, 0.5)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.perceiver.patch_ff.parameters():
            p.copy_(torch.randn_like(p))
    patches = torch.randn(2, 1, 17, model.vision.hidden_size)
    positions = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        with_mlp = model.perceiver(patches, positions)
        mlp, model.perceiver.patch_ff = model.perceiver.patch_ff, None
        without = model.perceiver(patches, positions)
        model.perceiver.patch_ff = mlp
    assert not torch.allclose(with_mlp, without)
    a, b = roundtrip(model, tmp_path)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="perceiver_patch_ff_mult"):
        build_model("llama", perceiver_patch_ff_mult=-1)


def test_save_load_with_lora_and_local_parts(tmp_path):
    lm = build_lm("qwen2", vocab_size=300)
    lm.save_pretrained(tmp_path / "lm_src")
    build_vision("siglip").save_pretrained(tmp_path / "vision_src")
    from flamingo_kit import FlamingoConfig

    config = FlamingoConfig(**TINY_FLAMINGO, lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    model = FlamingoModel.from_parts(tmp_path / "lm_src", tmp_path / "vision_src", config)
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    open_gates(model, 0.5)
    a, b = roundtrip(model, tmp_path / "out")
    assert torch.equal(a, b)
    assert not (tmp_path / "out" / "lm").exists()  # referenced by path, not copied


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")  # peft on gpt2's Conv1D layers
def test_lora_dropout_follows_train_mode_while_the_frozen_lm_stays_in_eval():
    model = randomize_all(build_model("gpt2", lora={"r": 4, "dropout": 0.5}), 3)  # LoRA B != 0
    ids = ids_with_images([2, 9])
    pixels = torch.randn(2, 2, 1, 3, 32, 32)
    model.train()
    dropouts = [(n, m) for n, m in model.lm.named_modules() if isinstance(m, torch.nn.Dropout)]
    lora = [m for n, m in dropouts if "lora_dropout" in n]
    own = [m for n, m in dropouts if "lora_dropout" not in n]
    assert lora and own  # gpt2 has its own dropout layers (p=0.1) next to LoRA's
    assert all(m.training for m in lora) and not any(m.training for m in own)
    torch.manual_seed(0)
    a, b = (model(input_ids=ids, pixel_values=pixels).logits for _ in range(2))
    assert not torch.allclose(a, b)  # LoRA dropout is active in training
    model.eval()
    assert not any(m.training for m in lora)
    with torch.no_grad():
        a, b = (model(input_ids=ids, pixel_values=pixels).logits for _ in range(2))
    assert torch.equal(a, b)

    # Without LoRA dropout a training-mode forward is deterministic: the LM's dropout is off.
    plain = randomize_all(build_model("gpt2", lora={"r": 4}), 3).train()
    a, b = (plain(input_ids=ids, pixel_values=pixels).logits for _ in range(2))
    assert torch.equal(a, b)


def test_missing_key_is_named(tmp_path):
    model = build_model("llama")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    victim = sorted(k for k in tensors if ".xattn." in k)[0]
    del tensors[victim]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=victim.replace(".", r"\.")):
        FlamingoModel.from_pretrained(tmp_path)


def test_bad_inputs_fail_clearly():
    model = build_model("llama")
    ids = ids_with_images([3])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)
    ids = ids_with_images([3, 5])
    with pytest.raises(ValueError, match="2 <image> tokens"):
        model(input_ids=ids, pixel_values=torch.randn(2, 1, 1, 3, 32, 32))
    with pytest.raises(ValueError, match="media_policy"):
        build_model("llama", media_policy="nearest")
    ids = ids_with_images([])
    ids[1, 4] = -3
    with pytest.raises(ValueError, match=r"input_ids\[1, 4\] = -3 is not a token id: the LM "
                                         r"vocabulary is 0\.\.299, the media tokens 300 and 301"):
        model(input_ids=ids)
    ids[1, 4] = 302
    with pytest.raises(ValueError, match=r"input_ids\[1, 4\] = 302 is not a token id"):
        model(input_ids=ids)


def test_too_many_images_for_the_resampler_fail_before_any_image_is_encoded():
    model = build_model("llama", perceiver_max_media=2)
    seen = []
    model.vision.tower.register_forward_hook(lambda *_: seen.append(1))
    ids = ids_with_images([1, 4, 7])
    with pytest.raises(ValueError, match="image position 2 exceeds perceiver_max_media=2"):
        model(input_ids=ids, pixel_values=torch.randn(2, 3, 1, 3, 32, 32))
    assert not seen


@pytest.mark.parametrize("every_n, wrapped", [(1, [0, 1, 2, 3]), (2, [1, 3]), (4, [3])])
def test_cross_attention_interval(every_n, wrapped):
    from flamingo_kit import FlamingoConfig, FlamingoModel

    lm = build_lm("llama", vocab_size=300, num_layers=4)
    config = FlamingoConfig(**{**TINY_FLAMINGO, "cross_attn_every_n_layers": every_n})
    model = FlamingoModel.from_parts(lm, build_vision("clip"), config)
    layers = find_decoder_layers(model.train().eval().lm)
    assert [i for i, layer in enumerate(layers) if hasattr(layer, "xattn")] == wrapped
    open_gates(model)
    ids = ids_with_images([2])
    images = torch.randn(2, 1, 1, 3, 32, 32)
    new = model.generate(input_ids=ids, pixel_values=images, max_new_tokens=3, eos_token_id=[])
    assert new.shape == (2, 3)


def test_parameter_report_lists_parts():
    report = build_model("llama").trainable_parameters_report()
    for part in ("perceiver", "cross-attention", "new-token rows", "vision tower"):
        assert part in report


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for enabled in (False, True):
        model = build_model("llama", cross_attn_every_n_layers=1)
        open_gates(model, 0.5)
        model.gradient_checkpointing_enable(enabled)
        model.train()
        ids = ids_with_images([1, 8])
        loss = model(input_ids=ids, pixel_values=torch.randn(2, 2, 1, 3, 32, 32,
                     generator=torch.Generator().manual_seed(0)), labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_vision_tower_from_a_full_two_tower_checkpoint(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from flamingo_kit.backbones import load_vision

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = CLIPConfig(text_config={**small, "vocab_size": 100},
                        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path)
    tower, source = load_vision(tmp_path)
    assert type(tower).__name__ == "CLIPVisionModel" and source == {"path": str(tmp_path)}
    full = CLIPModel.from_pretrained(tmp_path)
    assert torch.equal(tower.embeddings.patch_embedding.weight,
                       full.vision_model.embeddings.patch_embedding.weight)


def test_resampler_latents_start_distinct():
    # Latents that start alike collapse in training: cross-attention then sees one vector and
    # its query weights get no gradient.
    from flamingo_kit.perceiver import PerceiverResampler

    torch.manual_seed(0)
    resampler = PerceiverResampler(dim=64, out_dim=64, num_latents=16, depth=2, heads=4, dim_head=16)
    with torch.no_grad():
        out = resampler(torch.randn(8, 1, 17, 64) * 3, torch.zeros(8, dtype=torch.long))
    spread = (out - out.mean(1, keepdim=True)).norm(dim=-1).mean() / out.norm(dim=-1).mean()
    assert spread > 0.8


def test_feed_forward_on_every_token_option():
    """xattn_ff_all_tokens: the gated feed-forward also changes text-only prompts and tokens
    before the first image (OpenFlamingo); by default those tokens get exactly nothing."""
    text = torch.randint(3, 290, (2, 12))
    ids = ids_with_images([5, 9])
    images = torch.randn(2, 2, 1, 3, 32, 32)
    with torch.no_grad():
        outs = {}
        for every in (False, True):
            model = randomize_all(build_model("llama", xattn_ff_all_tokens=every)).eval()
            outs[every] = (model(input_ids=text).logits,
                           model(input_ids=ids, pixel_values=images).logits)
        bare = randomize_all(build_model("llama")).eval()
        bare_lm = bare.lm(input_ids=text).logits  # same LM weights: randomize_all is seeded
    assert (outs[False][0][..., :300] - bare_lm).abs().max() <= 1e-5
    assert (outs[True][0][..., :300] - bare_lm).abs().max() > 1e-2
    before_image = slice(0, 5)
    assert (outs[True][1][:, before_image] - outs[False][1][:, before_image]).abs().max() > 1e-2


def test_openflamingo_vision_options():
    """Patch tokens without the class token and/or after CLIP's post_layernorm; towers without
    a class token or whose output is already normalised are refused."""
    from flamingo_kit.backbones import VisionEncoder
    from flamingo_kit.from_scratch import build_vision

    clip = build_vision("clip")
    images = torch.randn(2, 1, 3, 32, 32)
    with torch.no_grad():
        full = VisionEncoder(clip)(images)
        cut = VisionEncoder(clip, "post_layernorm", drop_cls=True)(images)
    assert cut.shape[2] == full.shape[2] - 1
    assert torch.allclose(cut, clip.post_layernorm(full)[:, :, 1:])
    siglip = build_vision("siglip")
    with pytest.raises(ValueError, match="needs a CLIP tower"):
        VisionEncoder(siglip, "post_layernorm")
    with pytest.raises(ValueError, match="has no class token"):
        VisionEncoder(siglip, drop_cls=True)


def test_convnet_tower_gives_its_feature_map_cells_as_patch_tokens(tmp_path):
    """A BiT tower (group norm, no batch norm): patch tokens are the cells of its last feature
    map in row-major order, its output does not depend on train/eval mode (it is a usable
    frozen encoder), and a Flamingo model on it saves and loads to identical logits."""
    from flamingo_kit import FlamingoConfig
    from flamingo_kit.backbones import VisionEncoder, pooled_features

    tower = randomize_all(build_vision("bit", hidden_size=32, num_layers=2), 1)
    encoder = VisionEncoder(tower)
    assert encoder.hidden_size == 32
    images = torch.randn(2, 1, 3, 32, 32)
    with torch.no_grad():
        tokens = encoder(images)
        feature_map = tower(pixel_values=images[:, 0]).last_hidden_state  # [2, 32, 4, 4]
        assert tokens.shape == (2, 1, 16, 32)
        assert torch.equal(tokens[1, 0, 2 * 4 + 3], feature_map[1, :, 2, 3])
        assert pooled_features(tower(pixel_values=images[:, 0])).shape == (2, 32)
        tower.train()
        assert torch.allclose(encoder(images), tokens, atol=1e-6)
    tower.eval()
    model = FlamingoModel.from_parts(build_lm("llama", vocab_size=300), tower,
                                     FlamingoConfig(**TINY_FLAMINGO))
    randomize_all(model, 2)
    a, b = roundtrip(model, tmp_path)
    assert torch.equal(a, b)
    images_changed = torch.randn(2, 2, 1, 3, 32, 32)
    with torch.no_grad():
        c = model(input_ids=ids_with_images([2, 9]), pixel_values=images_changed).logits
    assert (a - c).abs().max() > 1e-3  # the images reach the LM through the convnet


def test_any_hf_convnet_is_a_tower():
    """A batch-norm ResNet (frozen, so in eval mode) gives its feature map's cells too."""
    from transformers import ResNetConfig, ResNetModel

    from flamingo_kit.backbones import VisionEncoder

    torch.manual_seed(0)
    resnet = ResNetModel(ResNetConfig(embedding_size=16, hidden_sizes=[16, 24], depths=[1, 1],
                                      layer_type="basic")).eval()
    with torch.no_grad():
        tokens = VisionEncoder(resnet)(torch.randn(2, 1, 3, 32, 32))
    assert tokens.shape == (2, 1, 16, 24)  # 32 px / stride 8 -> 4x4 cells of width 24
