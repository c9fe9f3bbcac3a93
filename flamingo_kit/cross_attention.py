"""Gated cross-attention from text tokens to image latents, and which image each token sees.

``MediaLayout`` is computed once per forward call from the token ids and shared by every
cross-attention layer. Its constructors are the only places that decide which token sees which
image: a whole input (``build``, also after a cached prefix or with several documents packed in
a row), one new token per row after a prompt (``for_decoding``), rows repeated for beams
(``repeated``). Under ``immediate`` each token attends only to the latents of the most recent
``<image>`` at or before it in its document. Tokens are
grouped by the image they see and cut into fixed-size chunks, so attention runs as one fused
``scaled_dot_product_attention`` over ``[chunks, heads, chunk, latents]``: the work per token is
one image's latents whatever the number of images in the sequence, and no dense
``[T, N_images x latents]`` mask is built.

Reading order: ``ChunkPlan``, ``MediaLayout``, ``cross_attend`` / ``attend_from_media_tokens``,
``GatedCrossAttentionBlock``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flamingo_kit.perceiver import feed_forward

MAX_CHUNK = 64


@dataclass
class ChunkPlan:
    """Where each token that sees an image goes in the chunked query tensor."""

    tokens: torch.Tensor  # [A] flat indices (b * T + t) of tokens that see an image
    chunk: torch.Tensor  # [A] chunk of each such token
    offset: torch.Tensor  # [A] position of the token inside its chunk
    chunk_media: torch.Tensor  # [n_chunks] flat image index (b * N + n) each chunk attends to
    chunk_size: int
    one_chunk_per_image: bool  # chunk i is image i: keys/values are used in place, not copied

    @classmethod
    def build(cls, media_index: torch.Tensor, num_media: int) -> ChunkPlan:
        """Group tokens by (row, image); ``media_index`` is non-decreasing along each row
        where it is >= 0 (a packed row's documents take it back to -1 before their first image)."""
        b, t = media_index.shape
        flat = media_index.reshape(-1)
        tokens = torch.nonzero(flat >= 0).squeeze(1)
        group = (tokens // t) * num_media + flat[tokens]  # sorted: rows, then images
        counts = torch.bincount(group, minlength=b * num_media)
        n_groups = int((counts > 0).sum())
        longest = int(counts.max()) if counts.numel() else 0
        mean_len = max(tokens.numel() / max(n_groups, 1), 1.0)
        one_per_image = 0 < longest <= min(MAX_CHUNK, 2 * mean_len)
        if one_per_image:
            # Groups of similar length: one chunk per image, padded to the longest group.
            size = longest
            chunks_per_group = torch.ones_like(counts)
        else:
            # Uneven groups: chunks about as long as an average group, so little padding.
            size = min(MAX_CHUNK, 2 ** int(math.log2(mean_len)))
            chunks_per_group = (counts + size - 1) // size
        chunk_start = torch.cumsum(chunks_per_group, 0) - chunks_per_group
        group_start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(tokens.numel(), device=flat.device) - group_start[group]
        chunk_media = torch.repeat_interleave(
            torch.arange(b * num_media, device=flat.device), chunks_per_group
        )
        return cls(tokens, chunk_start[group] + rank // size, rank % size, chunk_media, size,
                   one_per_image)


@dataclass
class MediaLayout:
    """Which images each text token may attend to, for one forward call.

    ``media_index[b, t]`` is the index of the latest image at or before token t of row b
    (counting images already in a KV cache), ``-1`` before the first image. In a packed row
    (several documents) images are those of the token's own document: ``first_media[b, t]`` is
    the row index of its document's first image, and ``media_index`` is ``-1`` until then.
    """

    media_index: torch.Tensor  # [B, T] long
    num_media: int
    policy: str
    tokens: torch.Tensor  # [A] flat indices (b * T + t) of the tokens that see an image
    plan: ChunkPlan | None = None  # immediate
    visible: torch.Tensor | None = None  # all_previous: [B, T, N] bool
    first_media: torch.Tensor | None = None  # [B, T] long; None: 0 (one document per row)

    @property
    def has_media(self) -> torch.Tensor:
        """``[B, T, 1]`` bool: the token sees at least one image."""
        return (self.media_index >= 0).unsqueeze(-1)

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        image_token_id: int,
        num_media: int,
        policy: str,
        images_before: int = 0,
        document_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> MediaLayout:
        """Layout for ``input_ids``, which continue a cached prefix holding ``images_before``
        images in every row (0: no prefix); the input's images are the sequence's images
        ``images_before``, ``images_before + 1``, ... as in the whole prompt.

        ``document_ids`` ``[B, T]`` (non-decreasing along a row) packs several documents in a
        row: a token sees only images of its own document, as if the document were alone.
        Padding (``attention_mask`` 0) sees no image: it gets nothing from cross-attention and
        costs nothing there (no real token reads a padding token's output).
        """
        is_image = (input_ids == image_token_id).long()
        seen = torch.cumsum(is_image, dim=1) + images_before
        index, before = seen - 1, None
        if document_ids is not None:
            starts = torch.ones_like(document_ids, dtype=torch.bool)
            starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
            # Images of the row before each token's document (non-decreasing, so a running max
            # carries each document's value forward).
            before = torch.where(starts, seen - is_image, 0).cummax(dim=1).values
            index = torch.where(seen > before, index, -1)
        if attention_mask is not None:
            index = index.masked_fill(attention_mask == 0, -1)
        return cls.from_media_index(index, num_media, policy, first_media=before)

    @classmethod
    def from_media_index(cls, media_index: torch.Tensor, num_media: int, policy: str,
                         first_media: torch.Tensor | None = None) -> MediaLayout:
        """Layout of tokens whose latest image is ``media_index`` (``-1``: none yet) and whose
        earliest visible image is ``first_media`` (``None``: image 0)."""
        if policy == "immediate":
            plan = ChunkPlan.build(media_index, num_media)
            return cls(media_index, num_media, policy, plan.tokens, plan=plan,
                       first_media=first_media)
        tokens = torch.nonzero(media_index.reshape(-1) >= 0).squeeze(1)
        media = torch.arange(num_media, device=media_index.device)
        visible = media <= media_index[..., None]
        if first_media is not None:
            visible &= media >= first_media[..., None]
        return cls(media_index, num_media, policy, tokens, visible=visible,
                   first_media=first_media)

    def image_positions(self, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
        """Media position of each ``<image>`` of ``input_ids`` in row-major order: its index
        among its document's images (its sequence's, counting a cached prefix's images)."""
        is_image = input_ids == image_token_id
        first = 0 if self.first_media is None else self.first_media[is_image]
        return self.media_index[is_image] - first

    def for_decoding(self) -> tuple[MediaLayout, torch.Tensor | None]:
        """The layout of one new token per row after these tokens, and the images it keeps.

        A new token sees what the last token of its row sees. Under ``immediate`` that is at
        most one image, the row's latest: decoding keeps only its keys/values (``kept[b]``, the
        image's index in row b; 0 for a row without images) and the returned layout indexes
        that single image (0, or -1 for a row without images). Under ``all_previous`` every
        image stays (``kept`` is None).
        """
        latest = self.media_index[:, -1:]  # [B, 1] each row's latest image, -1 if none
        if self.policy != "immediate":
            return MediaLayout.from_media_index(latest, self.num_media, self.policy), None
        single = MediaLayout.from_media_index(latest.clamp(max=0), 1, self.policy)
        return single, latest[:, 0].clamp(min=0)

    def repeated(self, repeats: int) -> MediaLayout:
        """Each row ``repeats`` times in a row (beams of one prompt see the same images)."""
        index = self.media_index.repeat_interleave(repeats, 0)
        first = None if self.first_media is None else self.first_media.repeat_interleave(repeats, 0)
        return MediaLayout.from_media_index(index, self.num_media, self.policy, first)


def cross_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: MediaLayout
) -> torch.Tensor:
    """q ``[B, T, H, d]``; k, v ``[B, N, H, L, d]`` -> ``[B, T, H, d]``, zero where no image."""
    b, t, h, d = q.shape
    out = attend_from_media_tokens(q.reshape(b * t, h, d)[layout.tokens], k, v, layout)
    return q.new_zeros(b * t, h, d).index_put((layout.tokens,), out).view(b, t, h, d)


def attend_from_media_tokens(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: MediaLayout
) -> torch.Tensor:
    """Queries ``[A, H, d]`` of the tokens that see an image (``layout.tokens``, in order);
    k, v ``[B, N, H, L, d]`` -> ``[A, H, d]``."""
    a, h, d = q.shape
    if layout.plan is not None:
        plan = layout.plan
        n_chunks = plan.chunk_media.numel()
        if n_chunks == 0:
            return torch.zeros_like(q)
        q_chunks = q.new_zeros(n_chunks, plan.chunk_size, h, d)
        q_chunks[plan.chunk, plan.offset] = q
        k_chunks, v_chunks = k.flatten(0, 1), v.flatten(0, 1)
        if not plan.one_chunk_per_image:
            k_chunks, v_chunks = k_chunks[plan.chunk_media], v_chunks[plan.chunk_media]
        out = F.scaled_dot_product_attention(q_chunks.transpose(1, 2), k_chunks, v_chunks)
        return out.transpose(1, 2)[plan.chunk, plan.offset]
    # all_previous: a token's keys are all latents of images 0..media_index (inherently O(N)).
    b, t = layout.media_index.shape
    n, lat = k.shape[1], k.shape[3]
    keys = k.permute(0, 2, 1, 3, 4).reshape(b, h, n * lat, d)
    values = v.permute(0, 2, 1, 3, 4).reshape(b, h, n * lat, d)
    mask = layout.visible.repeat_interleave(lat, dim=-1)
    mask = mask | ~layout.has_media  # rows with nothing visible would give NaN; not returned
    full = q.new_zeros(b * t, h, d).index_put((layout.tokens,), q).view(b, t, h, d)
    out = F.scaled_dot_product_attention(full.transpose(1, 2), keys, values,
                                         attn_mask=mask[:, None])
    return out.transpose(1, 2).reshape(b * t, h, d)[layout.tokens]


class GatedCrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention then feed-forward, each scaled by ``tanh(gate)``.

    Gates start at 0, so a freshly built model computes exactly what the frozen LM computes.
    Tokens that see no image (text before a document's first image, a packed row's padding) get
    exactly zero from the whole block and cost nothing: only the tokens that see an image are
    gathered and run through it. Unless ``ff_all_tokens``:
    then the gated feed-forward applies to every token, with or without images in the call
    (OpenFlamingo's block; its attention still gives zero to tokens before the first image).
    """

    def __init__(self, dim: int, media_dim: int, heads: int, dim_head: int, ff_mult: int,
                 ff_all_tokens: bool = False):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.ff_all_tokens = ff_all_tokens
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def project_media(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents ``[B, N, L, D]`` -> keys, values ``[B, N, H, L, d]`` (cacheable per image)."""
        k, v = self.to_kv(latents).chunk(2, dim=-1)
        return tuple(x.unflatten(-1, (self.heads, self.dim_head)).transpose(2, 3) for x in (k, v))

    def forward(
        self,
        hidden: torch.Tensor,
        media_kv: tuple[torch.Tensor, torch.Tensor] | None,
        layout: MediaLayout | None,
    ) -> torch.Tensor:
        """hidden ``[B, T, D]`` -> hidden with the gated image information added.

        ``media_kv``/``layout`` are ``None`` when the call has no images at all.
        """
        if media_kv is None:
            if not self.ff_all_tokens:
                return hidden
            return hidden + torch.tanh(self.ff_gate).to(hidden.dtype) * self.ff(hidden)
        # Only the tokens that see an image go through the block; the others pass unchanged.
        b, t, dim = hidden.shape
        flat = hidden.reshape(b * t, dim)
        x = flat[layout.tokens]
        q = self.to_q(self.norm(x)).unflatten(-1, (self.heads, self.dim_head))
        k, v = media_kv
        attn = attend_from_media_tokens(q, k.to(q.dtype), v.to(q.dtype), layout).flatten(-2)
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * self.to_out(attn)
        if self.ff_all_tokens:
            flat = flat.index_copy(0, layout.tokens, x)
            return (flat + torch.tanh(self.ff_gate).to(flat.dtype) * self.ff(flat)).view(b, t, dim)
        x = x + torch.tanh(self.ff_gate).to(x.dtype) * self.ff(x)
        return flat.index_copy(0, layout.tokens, x).view(b, t, dim)
