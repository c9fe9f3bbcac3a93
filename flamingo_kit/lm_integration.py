"""Insert gated cross-attention into any Hugging Face decoder-only LM.

The decoder blocks are found structurally (the ModuleList holding ``num_hidden_layers`` blocks of
one class), never by a table of class names, and the model's classes are never swapped. Every
n-th block is wrapped by ``FlamingoLayer``, which applies its cross-attention block to the
hidden states and then calls the original block unchanged.

Media reach the wrapped layers through ``media_scope``: a context variable set for the duration
of one forward call (the only one in flamingo-kit). Nothing about a call stays on the layers
after it returns.

Reading order: ``media_scope``, ``FlamingoLayer``, ``find_decoder_layers``,
``insert_cross_attention``; ``lm_body`` is the LM without its head; ``packing_problem`` tells
whether the LM keeps the documents of a packed row apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flamingo_kit.cross_attention import GatedCrossAttentionBlock
from flamingo_kit.media import MediaState

_ACTIVE_MEDIA: ContextVar[MediaState | None] = ContextVar("flamingo_media", default=None)


@contextlib.contextmanager
def media_scope(state: MediaState | None) -> Iterator[None]:
    """Make ``state`` visible to the wrapped layers for the calls inside the block."""
    token = _ACTIVE_MEDIA.set(state)
    try:
        yield
    finally:
        _ACTIVE_MEDIA.reset(token)


def current_media() -> MediaState | None:
    """The media state of the forward call in progress, if any."""
    return _ACTIVE_MEDIA.get()


class FlamingoLayer(nn.Module):
    """A decoder block preceded by a gated cross-attention block.

    Attribute lookups the LM makes on its blocks (e.g. ``attention_type``) fall through to the
    wrapped block, so the LM's own forward code runs unchanged.
    """

    def __init__(self, decoder_layer: nn.Module, xattn: GatedCrossAttentionBlock, xattn_index: int):
        super().__init__()
        self.decoder_layer = decoder_layer
        self.xattn = xattn
        self.xattn_index = xattn_index  # the n-th cross-attention layer: its key in K/V caches
        # Recompute this layer in backward instead of storing its activations. The LM's own
        # checkpointing does not apply: a frozen LM stays in eval mode.
        self.activation_checkpointing = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("decoder_layer"), name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:]
        state = current_media()
        # Image K/V are computed outside any checkpointed region: they are cached per call.
        kv = state.media_kv(self.xattn_index, self.xattn) if state is not None else None

        def run(hidden):
            if kv is not None or self.xattn.ff_all_tokens:
                hidden = self.xattn(hidden, kv, state.layout if kv is not None else None)
            return self.decoder_layer(hidden, *rest, **kwargs)

        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(run, hidden, use_reentrant=False)
        return run(hidden)


def lm_body(lm: nn.Module) -> nn.Module:
    """The causal LM without its head (HF's ``base_model``), which returns the last hidden states.

    ``FlamingoModel`` calls the body and then the head itself, so that it can add the media
    tokens' logits in plain sight.
    """
    body = lm.base_model
    if body is lm:
        raise ValueError(f"{type(lm).__name__} has no body module apart from its head "
                         f"(base_model_prefix {lm.base_model_prefix!r} names no submodule)")
    return body


@torch.no_grad()
def packing_problem(lm: nn.Module) -> str | None:
    """Why ``lm`` cannot run packed rows exactly, or ``None`` when it can. Measured, not looked up.

    Packed rows follow transformers' convention: no attention mask, ``position_ids`` restarting
    at 0 at every document (``masking_utils`` then masks attention across documents). Some
    families build their mask without the position ids (OPT, MPT in transformers 5.x) or need
    another attention implementation; this runs two tiny packed rows through the LM's body and
    checks that (1) a document's hidden states do not change when the document before it does
    (no attention across the boundary; exact) and (2) they equal the document run alone
    (positions restart; to the precision of the LM's dtype).
    """
    body = lm_body(lm)
    weight = lm.get_input_embeddings().weight
    vocab, device = lm.get_input_embeddings().num_embeddings, weight.device
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, vocab, (n,), generator=generator) for n in (5, 5, 7)]

    def hidden(parts: list[torch.Tensor]) -> torch.Tensor:
        ids = torch.cat(parts)[None].to(device)
        positions = torch.cat([torch.arange(len(p)) for p in parts])[None].to(device)
        out = body(input_ids=ids, position_ids=positions, use_cache=False)
        return out.last_hidden_state[0, -len(parts[-1]):].float()

    alone, after_one, after_other = hidden(docs[2:]), hidden(docs[::2]), hidden(docs[1:])
    scale = alone.abs().max().clamp(min=1e-6)
    name = type(lm).__name__
    if float((after_one - after_other).abs().max() / scale) > 1e-4:
        return (f"{name} lets a token attend to the previous document of a packed row (its "
                "attention mask ignores the position ids that separate documents)")
    tolerance = 1e-4 if weight.dtype == torch.float32 else 5e-2
    if float((after_one - alone).abs().max() / scale) > tolerance:
        return (f"{name} computes a packed document differently from the same document alone "
                "(its positions do not restart with position_ids)")
    return None


def num_decoder_layers(lm: nn.Module) -> int:
    """Number of decoder blocks declared by the LM's (text) config."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    return int(config.num_hidden_layers)


def find_decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks: ``num_hidden_layers`` modules of one class.

    Blocks already wrapped by ``FlamingoLayer`` count as their wrapped class. When several
    lists qualify (rare), the one holding the most parameters wins.
    """
    n_layers = num_decoder_layers(lm)

    def block_type(block: nn.Module) -> type:
        return type(block.decoder_layer) if isinstance(block, FlamingoLayer) else type(block)

    candidates = [
        module
        for module in lm.modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == n_layers
        and len({block_type(block) for block in module}) == 1
    ]
    if not candidates:
        raise ValueError(
            f"no ModuleList of {n_layers} identical decoder blocks found in "
            f"{type(lm).__name__}; is it a decoder-only causal LM?"
        )
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))


def flamingo_layers(lm: nn.Module) -> list[FlamingoLayer]:
    """The decoder blocks that carry a cross-attention block, in layer order."""
    return [module for module in lm.modules() if isinstance(module, FlamingoLayer)]


def cross_attention_layer_indices(n_layers: int, every_n: int) -> list[int]:
    """Blocks preceded by cross-attention: every ``every_n``-th, counting from 1."""
    return [i for i in range(n_layers) if (i + 1) % every_n == 0]


def insert_cross_attention(
    lm: nn.Module, make_block, every_n: int
) -> list[GatedCrossAttentionBlock]:
    """Wrap every ``every_n``-th decoder block of ``lm`` in place; return the new blocks."""
    layers = find_decoder_layers(lm)
    blocks = []
    for xattn_index, index in enumerate(cross_attention_layer_indices(len(layers), every_n)):
        block = make_block()
        layers[index] = FlamingoLayer(layers[index], block, xattn_index)
        blocks.append(block)
    if not blocks:
        raise ValueError(
            f"cross_attn_every_n_layers={every_n} inserts no cross-attention into an LM with "
            f"{len(layers)} layers"
        )
    return blocks


def bare_lm_state_dict(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The LM's state dict with the original key names: wrappers and adapters removed."""
    out = {}
    for key, value in lm.state_dict().items():
        if ".xattn." in key or "lora_" in key:
            continue
        out[key.replace(".decoder_layer.", ".").replace(".base_layer.", ".")] = value
    return out
