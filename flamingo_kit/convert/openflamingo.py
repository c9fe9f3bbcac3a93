"""OpenFlamingo ``checkpoint.pt`` -> a flamingo-kit directory that computes the same logits.

What the checkpoint holds (open_flamingo 2.0.1, ``train/train_utils.py``
``filter_state_dict_to_trainable``): the trainable parameters ``perceiver.*`` and
``lang_encoder.<decoder layers>.<i>.gated_cross_attn_layer.*``; every LM parameter whose name
contains "embed", trained or not (GPT-NeoX ``embed_in``/``embed_out``, Llama ``embed_tokens``);
and the input embedding under any other name when it was trained (MPT ``transformer.wte``).
The embeddings have OpenFlamingo's vocabulary: the tokenizer's tokens, then ``<|endofchunk|>``,
``<image>`` and, for tokenizers without a pad token, ``<PAD>`` (``src/factory.py``), the LM
having been resized to that length.

How it maps:

- ``perceiver.*`` -> ``FlamingoModel.perceiver`` built without output projection and without
  media-position/frame embeddings (unless the checkpoint has them), ``dim_head`` 64;
- the block of decoder layer i -> our block before layer i (``attn.X`` -> ``X``), with the
  feed-forward applied to every token as OpenFlamingo does;
- LM tensors in the checkpoint (embeddings, decoder weights if present) are compared with the
  LM directory's. The LM is written beside the model (``OUT/lm``) with OpenFlamingo's
  vocabulary when its size or any value differs, so logits match column for column;
- the two media-token rows (input and output head) -> the decoupled new-token rows.

Rows OpenFlamingo never saved (e.g. output-head rows of the new tokens of an untied LM whose
vocabulary grew: a random initialisation, frozen) cannot be recovered; the report says so and
they start at the mean row.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessorPil

from flamingo_kit.backbones import load_lm, load_vision, require_local_dir
from flamingo_kit.config import FlamingoConfig
from flamingo_kit.lm_integration import (
    cross_attention_layer_indices,
    find_decoder_layers,
    flamingo_layers,
)
from flamingo_kit.modeling import FlamingoModel
from flamingo_kit.processing import FlamingoProcessor

# Added by OpenFlamingo's factory in this order, then "<PAD>" when the tokenizer has no pad.
OPENFLAMINGO_TOKENS = ("<|endofchunk|>", "<image>")
PAD_TOKEN = "<PAD>"
# helpers.py: PerceiverAttention and MaskedCrossAttention default to dim_head=64, and
# Flamingo / init_flamingo never pass another value, so only heads * 64 shows in the tensors.
DIM_HEAD = 64
# open_clip's ViT normalisation ("openai" preprocessing, what OpenFlamingo's models saw).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REPORT_NAME = "conversion_report.txt"
_WRAPPERS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


class ConversionError(ValueError):
    """The checkpoint cannot be converted as given; the message names the file or key."""


@dataclass
class ConversionReport:
    """What the conversion inferred and anything it could not carry over exactly."""

    notes: list[str] = field(default_factory=list)
    lm_written: bool = False

    def note(self, text: str) -> None:
        """Record one line of the report."""
        self.notes.append(text)

    def __str__(self) -> str:
        return "\n".join(f"- {line}" for line in self.notes)


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model tensors of an OpenFlamingo checkpoint, read without executing any code.

    Accepts a state dict (the released ``checkpoint.pt``) or a training checkpoint with a
    ``model_state_dict``; DDP/FSDP/activation-checkpointing wrapper prefixes are removed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ConversionError(
            f"{path}: refused: it holds pickled objects other than tensors and plain containers, "
            f"and unpickling them could execute code (torch.load(weights_only=True): {reason})"
        ) from None
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ConversionError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]  # open_flamingo/train/train_utils.py save_checkpoint
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        clean = _clean_key(key)
        if clean in state and not torch.equal(state[clean], value):
            raise ConversionError(f"{path}: {key!r} and another key both mean {clean!r}")
        state[clean] = value
    return state


def _clean_key(key: str) -> str:
    while key.startswith("module."):  # DDP
        key = key[len("module."):]
    for wrapper in _WRAPPERS:
        key = key.replace(wrapper, "")
    return key


def convert_openflamingo(
    checkpoint: str | os.PathLike,
    lm: str | os.PathLike,
    vision: str | os.PathLike,
    out: str | os.PathLike,
    cross_attn_every: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype | None = torch.float32,
    vision_features: str = "last_hidden_state",
    self_contained: bool = False,
) -> ConversionReport:
    """Convert ``checkpoint`` (with the LM and CLIP directories it was trained on) into ``out``.

    ``dtype`` is the LM's (``None``: as stored; OpenFlamingo ran its LMs in float32).
    ``vision_features="last_hidden_state"`` feeds CLIP's patch tokens before its final
    LayerNorm, as open_clip < 2.23 returned them when the released models were trained;
    ``"post_layernorm"`` matches OpenFlamingo run with open_clip >= 2.23. ``self_contained``
    also copies the vision tower (and an unchanged LM) into ``out``. Raises
    :class:`ConversionError` for anything that does not fit; returns what it inferred and any
    rows it could not recover (also written to ``out/conversion_report.txt``).
    """
    out = os.fspath(out)
    if os.path.isdir(out) and os.listdir(out):
        raise ConversionError(f"--out {out!r} exists and is not empty; choose a new directory")
    report = ConversionReport()
    state = load_checkpoint(checkpoint)
    perceiver_state, lang_state = _split_checkpoint(state, os.fspath(checkpoint))
    report.note(f"checkpoint {os.fspath(checkpoint)}: {len(state)} tensors")

    # Local directories only, checked before any loader sees the names (no hub look-ups).
    lm = require_local_dir(lm, "--lm", "config.json")
    vision = require_local_dir(vision, "--vision", "config.json")
    tokenizer = require_local_dir(tokenizer or lm, "--tokenizer")
    lm_model = _load_lm(lm, dtype)
    tower, vision_source = load_vision(vision, torch.float32)
    text_tokenizer, added_ids = _openflamingo_tokenizer(tokenizer, report)
    layers = find_decoder_layers(lm_model)
    layers_path = _module_name(lm_model, layers)

    perceiver_fields, perceiver_tensors = _perceiver(perceiver_state, tower, report)
    blocks, lm_tensors = _sort_lm_tensors(lang_state, lm_model, layers_path, len(layers))
    every_n = _cross_attn_every(sorted(blocks), len(layers), cross_attn_every, report)
    xattn_fields = _xattn_fields(blocks, lm_model, perceiver_tensors["latents"].shape[1], report)

    media_ids = _rebuild_lm(lm_model, lm_tensors, text_tokenizer, added_ids, report)
    lm_source = {"path": os.path.abspath(lm)}
    if report.lm_written:
        lm_source = {"config": lm_model.config.to_dict()}  # written to OUT/lm by save_pretrained

    config = FlamingoConfig(
        cross_attn_every_n_layers=every_n,
        media_policy="immediate",  # helpers.py: only_attend_immediate_media=True, never changed
        vision_features=vision_features,
        vision_drop_cls=True,
        image_token_id=media_ids["<image>"],
        eoc_token_id=media_ids["<|endofchunk|>"],
        lm_source=lm_source,
        vision_source=vision_source,
        **perceiver_fields,
        **xattn_fields,
    )
    model = FlamingoModel(lm_model, tower, config)
    _load_strict(model.perceiver, perceiver_tensors, "perceiver")
    indices = cross_attention_layer_indices(len(layers), every_n)
    for index, layer in zip(indices, flamingo_layers(model.lm)):
        _load_strict(layer.xattn, blocks[index], f"cross-attention of decoder layer {index}")
    _copy_media_rows(model, media_ids)

    model.save_pretrained(out, self_contained=self_contained)
    image_processor = _image_processor(vision, tower, report)
    FlamingoProcessor(text_tokenizer, image_processor).save_pretrained(out)
    with open(os.path.join(out, REPORT_NAME), "w", encoding="utf-8") as f:
        f.write(str(report) + "\n")
    return report


# -- reading the checkpoint --------------------------------------------------------------------


def _split_checkpoint(state: dict[str, torch.Tensor], path: str):
    """``perceiver.*`` and ``lang_encoder.*`` tensors (prefixes removed); nothing else allowed."""
    perceiver, lang, other = {}, {}, []
    for key, value in state.items():
        if key.startswith("perceiver."):
            perceiver[key[len("perceiver."):]] = value
        elif key.startswith("lang_encoder."):
            lang[key[len("lang_encoder."):]] = value
        else:
            other.append(key)
    if other:
        hint = ""
        if any(k.startswith("vision_encoder.") for k in other):
            hint = (" (vision-encoder weights: OpenFlamingo's filter_state_dict_to_trainable "
                    "removes them, so this checkpoint was saved unfiltered; they are not compared "
                    "with --vision: delete the vision_encoder.* keys if they are its unchanged "
                    "CLIP weights)")
        raise ConversionError(f"{path}: unexpected keys {_listing(other)}{hint}")
    if not perceiver:
        raise ConversionError(f"{path}: no perceiver.* tensors; is this an OpenFlamingo checkpoint?")
    return perceiver, lang


def _listing(keys: list[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return str(keys[:limit]) + more


def _module_name(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def _perceiver(state: dict[str, torch.Tensor], tower: nn.Module, report: ConversionReport):
    """FlamingoConfig perceiver fields and our perceiver's state dict, from the tensors."""
    if "latents" not in state or "layers.0.0.to_q.weight" not in state:
        raise ConversionError(f"perceiver tensors incomplete: {_listing(list(state))}")
    num_latents, dim = state["latents"].shape
    vision_dim = (getattr(tower.config, "vision_config", None) or tower.config).hidden_size
    if dim != vision_dim:
        raise ConversionError(
            f"the checkpoint's perceiver works at width {dim} but the --vision tower's hidden "
            f"size is {vision_dim}: pass the CLIP tower this checkpoint was trained with"
        )
    depth = len({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
    inner = state["layers.0.0.to_q.weight"].shape[0]
    ff_inner = state["layers.0.1.1.weight"].shape[0]
    if inner % DIM_HEAD or ff_inner % dim:
        raise ConversionError(f"perceiver attention width {inner} is not a multiple of "
                              f"{DIM_HEAD} or its feed-forward width {ff_inner} not of {dim}")
    ours = dict(state)
    media = ours.pop("media_time_embs", None)  # [max_media, 1, dim] in OpenFlamingo
    if media is not None:
        ours["media_pos_embs"] = media.reshape(media.shape[0], -1)
    frames = ours.get("frame_embs")
    fields = dict(
        perceiver_num_latents=num_latents, perceiver_depth=depth,
        perceiver_heads=inner // DIM_HEAD, perceiver_dim_head=DIM_HEAD,
        perceiver_ff_mult=ff_inner // dim, perceiver_output_proj=False,
        perceiver_max_media=0 if media is None else media.shape[0],
        perceiver_max_frames=0 if frames is None else frames.shape[0],
    )
    report.note(f"perceiver: {depth} layers, {num_latents} latents of width {dim}, "
                f"{inner // DIM_HEAD} heads x {DIM_HEAD}, ff x{ff_inner // dim}, no output "
                f"projection, media-position embeddings: {'yes' if media is not None else 'no'}, "
                f"frame embeddings: {'yes' if frames is not None else 'no'}")
    return fields, ours


def _sort_lm_tensors(lang: dict[str, torch.Tensor], lm: nn.Module, layers_path: str,
                     n_layers: int):
    """Split ``lang_encoder.*`` into cross-attention blocks by layer and LM parameters by name."""
    block_key = re.compile(rf"^(?:{re.escape(layers_path)}\.(\d+)\.gated_cross_attn_layer|"
                           rf"gated_cross_attn_layers\.(\d+))\.(.+)$")
    decoder_key = re.compile(rf"^(?:{re.escape(layers_path)}\.(\d+)\.decoder_layer|"
                             rf"old_decoder_blocks\.(\d+))\.(.+)$")
    lm_names = {name for name, _ in lm.named_parameters(remove_duplicate=False)}
    rename = _legacy_key_renamer(lm)
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    lm_tensors: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in lang.items():
        if match := block_key.match(key):
            index = int(match.group(1) or match.group(2))
            name = match.group(3)
            target, name = blocks.setdefault(index, {}), name.removeprefix("attn.")
        elif match := decoder_key.match(key):
            index = match.group(1) or match.group(2)
            target, name = lm_tensors, rename(f"{layers_path}.{index}.{match.group(3)}")
        elif rename(key) in lm_names:
            target, name = lm_tensors, rename(key)
        else:
            unexpected.append(f"lang_encoder.{key}")
            continue
        if name in target and not torch.equal(target[name], value):
            raise ConversionError(f"lang_encoder.{key} disagrees with another copy of {name}")
        target[name] = value
    unknown = [n for n in lm_tensors if n not in lm_names]
    if unexpected or unknown:
        raise ConversionError(
            f"checkpoint keys that are neither cross-attention nor parameters of the --lm "
            f"model ({type(lm).__name__}, decoder layers at '{layers_path}'): "
            f"{_listing(unexpected + unknown)}"
        )
    beyond = [i for i in blocks if i >= n_layers]
    if not blocks or beyond:
        raise ConversionError(
            f"cross-attention blocks found before decoder layers {sorted(blocks)}; the --lm "
            f"model has {n_layers} layers at '{layers_path}'"
        )
    return blocks, lm_tensors


def _legacy_key_renamer(lm: nn.Module):
    """Key -> key as transformers renames checkpoints written by its older versions.

    OpenFlamingo saved its LM keys with the names of the transformers it ran (4.x); e.g.
    GPT-NeoX's ``embed_out`` is ``lm_head`` today. ``from_pretrained`` applies these renamings
    to checkpoints; the same list applies here.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # a transformers without key conversions: names are as saved
        return lambda key: key
    renamings = [t for t in get_model_conversion_mapping(lm) if isinstance(t, WeightRenaming)]
    return lambda key: apply_renamings(key, renamings)


def _cross_attn_every(indices: list[int], n_layers: int, given: int | None,
                      report: ConversionReport) -> int:
    every = indices[0] + 1  # flamingo_lm.py init_flamingo: (layer_idx + 1) % n == 0
    if indices != cross_attention_layer_indices(n_layers, every):
        raise ConversionError(f"cross-attention before decoder layers {indices} of {n_layers} is "
                              "not OpenFlamingo's every-n-th-layer pattern")
    if given is not None and given != every:
        raise ConversionError(f"--cross-attn-every {given}, but the checkpoint has "
                              f"cross-attention before layers {indices} (every {every})")
    report.note(f"cross-attention before decoder layers {indices} (every {every} of {n_layers})")
    return every


def _xattn_fields(blocks: dict[int, dict[str, torch.Tensor]], lm: nn.Module, media_dim: int,
                  report: ConversionReport) -> dict[str, Any]:
    first = blocks[min(blocks)]
    try:
        inner, lm_dim = first["to_q.weight"].shape
        ff_inner = first["ff.1.weight"].shape[0]
        kv_dim = first["to_kv.weight"].shape[1]
    except KeyError as error:
        raise ConversionError(f"cross-attention block incomplete: no {error.args[0]}") from None
    hidden = lm.config.get_text_config().hidden_size
    if lm_dim != hidden or kv_dim != media_dim:
        raise ConversionError(
            f"cross-attention reads width {lm_dim} text and width {kv_dim} latents; the --lm "
            f"hidden size is {hidden} and the perceiver width {media_dim}"
        )
    if inner % DIM_HEAD or ff_inner % lm_dim:
        raise ConversionError(f"cross-attention width {inner} is not a multiple of {DIM_HEAD} or "
                              f"its feed-forward width {ff_inner} not of {lm_dim}")
    report.note(f"cross-attention: {inner // DIM_HEAD} heads x {DIM_HEAD}, ff x{ff_inner // lm_dim}"
                ", feed-forward on every token, each token sees its latest image only")
    return dict(xattn_heads=inner // DIM_HEAD, xattn_dim_head=DIM_HEAD,
                xattn_ff_mult=ff_inner // lm_dim, xattn_ff_all_tokens=True)


def _load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tensors.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ConversionError(f"{what}: missing {missing or 'none'}, unexpected "
                              f"{unexpected or 'none'}, shape mismatches {shapes or 'none'}")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)


# -- the language model ------------------------------------------------------------------------


def _load_lm(lm: str | os.PathLike, dtype: torch.dtype | None) -> nn.Module:
    try:
        model, _ = load_lm(lm, dtype)
    except ValueError as error:
        if "trust_remote_code" in str(error) or "does not recognize this architecture" in str(error):
            raise ConversionError(
                f"--lm {os.fspath(lm)!r} needs code shipped with the checkpoint (remote code), "
                "which flamingo-kit never executes. OpenFlamingo-3B's MPT-1B (MosaicGPT) is such "
                f"a model; transformers has no built-in class for it. ({error})"
            ) from None
        raise
    return model.eval()


def _openflamingo_tokenizer(path: str, report: ConversionReport):
    """The LM's tokenizer with OpenFlamingo's tokens added exactly as its factory adds them,
    and the ids of the tokens it added."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    base_size = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(OPENFLAMINGO_TOKENS)})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    ids = tokenizer.convert_tokens_to_ids([*OPENFLAMINGO_TOKENS, tokenizer.pad_token])
    report.note(f"tokenizer {path}: {len(tokenizer)} tokens; <|endofchunk|>={ids[0]}, "
                f"<image>={ids[1]}, pad {tokenizer.pad_token!r}={ids[2]}")
    return tokenizer, set(range(base_size, len(tokenizer)))


def _rebuild_lm(lm: nn.Module, tensors: dict[str, torch.Tensor], tokenizer, added_ids: set[int],
                report: ConversionReport) -> dict[str, int]:
    """Give ``lm`` OpenFlamingo's vocabulary and the checkpoint's LM tensors; return media ids.

    Sets ``report.lm_written`` when the LM differs from its directory in any way.
    """
    n_vocab = len(tokenizer)
    media_ids = dict(zip(OPENFLAMINGO_TOKENS, tokenizer.convert_tokens_to_ids(list(OPENFLAMINGO_TOKENS))))
    embed_in, embed_out = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = embed_out.weight is embed_in.weight
    in_name = _module_name(lm, embed_in) + ".weight"
    out_name = _module_name(lm, embed_out) + ".weight"
    saved_in, saved_out = tensors.pop(in_name, None), tensors.pop(out_name, None)
    if tied and saved_in is not None and saved_out is not None and not torch.equal(saved_in, saved_out):
        raise ConversionError(f"the --lm ties {in_name} and {out_name} but the checkpoint's differ")
    if tied:
        saved_in = saved_out = saved_in if saved_in is not None else saved_out
    for name, saved in ((in_name, saved_in), (out_name, saved_out)):
        if saved is not None and saved.shape[0] != n_vocab:
            raise ConversionError(
                f"the checkpoint's {name} has {saved.shape[0]} rows but the tokenizer with "
                f"OpenFlamingo's tokens has {n_vocab}: pass the LM and tokenizer it was trained on"
            )
    old_in = embed_in.weight.detach().float().clone()
    old_out = old_in if tied else embed_out.weight.detach().float().clone()
    v_old = old_in.shape[0]
    if n_vocab != v_old:
        lm.resize_token_embeddings(n_vocab, mean_resizing=False)
        report.note(f"LM vocabulary resized from {v_old} to {n_vocab} rows, as OpenFlamingo did")
    changed = n_vocab != v_old
    tables = [("input embedding", in_name, lm.get_input_embeddings(), old_in, saved_in)]
    if not tied:
        tables.append(("output head", out_name, lm.get_output_embeddings(), old_out, saved_out))
    for what, name, module, old, saved in tables:
        changed |= _set_table(what, name, module, old, saved, added_ids, report)
    changed |= _set_lm_tensors(lm, tensors, report)
    lm_dtype = lm.get_input_embeddings().weight.dtype
    if changed and lm_dtype != torch.float32:
        report.note(f"the LM is kept in {lm_dtype}: the checkpoint's float32 tensors were rounded "
                    "to it (convert with --dtype float32 to keep them exact)")
    report.lm_written = changed
    report.note("LM written beside the model (OUT/lm) with OpenFlamingo's vocabulary and tensors"
                if changed else "LM unchanged: the model refers to the --lm directory")
    return media_ids


def _set_table(what: str, name: str, module: nn.Module, old: torch.Tensor,
               saved: torch.Tensor | None, new_ids: set[int], report: ConversionReport) -> bool:
    """Write one vocabulary table (input embedding or output head); True if it changed."""
    n_vocab, v_old = module.weight.shape[0], old.shape[0]
    table = old[:n_vocab]
    if n_vocab > v_old:  # rows OpenFlamingo's resize added
        table = torch.cat([table, old.mean(0, keepdim=True).expand(n_vocab - v_old, -1)])
    if saved is None:
        if n_vocab > v_old:
            report.note(
                f"{what} rows {v_old}..{n_vocab - 1} (OpenFlamingo's new tokens) are not in the "
                f"checkpoint ({name} was frozen at a random initialisation and not saved): they "
                "cannot be recovered and start at the mean row, so those tokens' "
                f"{'logits' if what == 'output head' else 'embeddings'} differ from OpenFlamingo's"
            )
    else:
        table = saved.float()
        shared = min(n_vocab, v_old)
        differs = (table[:shared] != old[:shared]).any(1)
        differs[[i for i in new_ids if i < shared]] = False
        if int(differs.sum()):
            report.note(f"{what}: {int(differs.sum())} of {shared} rows of the --lm differ in the "
                        "checkpoint (trained by OpenFlamingo): the checkpoint's rows are used")
    with torch.no_grad():
        module.weight.copy_(table.to(module.weight.dtype))
    shared = min(n_vocab, v_old)
    return n_vocab != v_old or not torch.equal(table[:shared], old[:shared])


def _set_lm_tensors(lm: nn.Module, tensors: dict[str, torch.Tensor],
                    report: ConversionReport) -> bool:
    """Copy other LM tensors of the checkpoint in; True if any differed from the LM's."""
    params = dict(lm.named_parameters(remove_duplicate=False))
    differing = []
    for name, value in tensors.items():
        param = params[name]
        if param.shape != value.shape:
            raise ConversionError(f"lang_encoder.{name}: checkpoint shape {tuple(value.shape)} "
                                  f"!= --lm shape {tuple(param.shape)}")
        if not torch.equal(param.detach().float(), value.float()):
            differing.append(name)
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
    if tensors:
        report.note(f"{len(tensors)} further LM tensors in the checkpoint, {len(differing)} "
                    f"differ from the --lm and are used{': ' + _listing(differing, 5) if differing else ''}")
    return bool(differing)


def _copy_media_rows(model: FlamingoModel, media_ids: dict[str, int]) -> None:
    """The decoupled new-token rows take the LM's (now OpenFlamingo's) rows of the media tokens."""
    rows = torch.tensor([media_ids["<image>"], media_ids["<|endofchunk|>"]])  # our row order
    head = model.lm.get_output_embeddings()
    bias = getattr(head, "bias", None)
    with torch.no_grad():
        model.media_tokens.embedding.weight.copy_(model.lm.get_input_embeddings().weight[rows])
        model.media_tokens.head.weight.copy_(head.weight[rows])
        model.media_tokens.head.bias.copy_(bias[rows] if bias is not None else torch.zeros(2))


# -- the processor -----------------------------------------------------------------------------


def _image_processor(vision: str, tower: nn.Module, report: ConversionReport):
    """The CLIP directory's image processor, or open_clip's OpenAI preprocessing if it has none."""
    if os.path.isfile(os.path.join(vision, "preprocessor_config.json")):
        report.note(f"image processor from {vision}")
        return AutoImageProcessor.from_pretrained(vision, backend="pil")
    size = (getattr(tower.config, "vision_config", None) or tower.config).image_size
    report.note(f"{vision} has no preprocessor_config.json: using open_clip's OpenAI "
                f"preprocessing (bicubic resize and centre crop to {size}, CLIP mean/std)")
    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        resample=3, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )

