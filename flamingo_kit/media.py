"""Images -> what the cross-attention layers read in one forward call.

``media_state`` runs the vision tower and the Perceiver Resampler on the images a batch uses
(``encode_images``) and lays out which token sees which image (a ``MediaLayout``); the result, a
:class:`MediaState`, also caches each cross-attention layer's projected image keys/values.
``continue_prefix`` does the same for input that continues a cached prefix (a
:class:`PrefixState` from ``prefill``): the prefix's images keep their latents and keys/values,
the new images come after them. ``FlamingoModel.forward`` and generation both call these.

Reading order: ``MediaState``, ``encode_images``, ``document_ids_from_positions``,
``media_state``, ``PrefixState``, ``continue_prefix``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from flamingo_kit.cross_attention import GatedCrossAttentionBlock, MediaLayout

if TYPE_CHECKING:
    from flamingo_kit.modeling import FlamingoModel


@dataclass
class MediaState:
    """Everything the cross-attention layers need for one forward call.

    ``kv_cache`` holds each cross-attention layer's projected image keys/values (keyed by the
    layer's ``xattn_index``); generation keeps the same dict across decoding steps so they are
    computed once per image, not once per step.
    """

    latents: torch.Tensor | None  # [B, N, L, D] image latents (None once K/V are all cached)
    layout: MediaLayout
    kv_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # K/V of the first images, computed earlier (a shared prefix): only the rest are projected.
    prefix_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def media_kv(self, xattn_index: int, block: GatedCrossAttentionBlock):
        """Keys/values of cross-attention layer ``xattn_index``, projected on first use."""
        if xattn_index not in self.kv_cache:
            done = self.prefix_kv.get(xattn_index)
            n_done = 0 if done is None else done[0].shape[1]
            kv = block.project_media(self.latents[:, n_done:])
            if done is not None:
                kv = tuple(torch.cat([old, new], dim=1) for old, new in zip(done, kv))
            self.kv_cache[xattn_index] = kv
        return self.kv_cache[xattn_index]

    def for_decoding(self) -> MediaState:
        """After the prompt: each row keeps only the keys/values its new tokens will see."""
        layout, kept = self.layout.for_decoding()
        if kept is None:
            return MediaState(None, layout, self.kv_cache)
        rows = torch.arange(kept.shape[0], device=kept.device)
        # Gather the one image's K/V each row keeps, once.
        kv = {i: tuple(t[rows, kept].unsqueeze(1) for t in kv) for i, kv in self.kv_cache.items()}
        return MediaState(None, layout, kv)

    def repeated(self, repeats: int) -> MediaState:
        """Each row ``repeats`` times (beams), from the cached keys/values."""
        kv = {i: tuple(t.repeat_interleave(repeats, 0) for t in kv)
              for i, kv in self.kv_cache.items()}
        return MediaState(None, self.layout.repeated(repeats), kv)


def encode_images(
    model: FlamingoModel, pixel_values: torch.Tensor, counts: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Latents ``[B, N, L, D]`` of the first ``counts[b]`` images of each row (others 0).

    ``positions`` holds the media position (media-position embedding) of each encoded image,
    row by row: its index among its sequence's images, counting a cached prefix's, or among its
    document's images in a packed row. Padding images are never encoded.
    """
    b, n = pixel_values.shape[:2]
    valid = torch.arange(n, device=counts.device)[None] < counts[:, None]
    # Indices, not a boolean mask: found once here, before the vision tower is queued (a
    # boolean index_put after the resampler would wait for it on an accelerator).
    rows, slots = (i.to(pixel_values.device) for i in valid.nonzero(as_tuple=True))
    patches = model.vision(pixel_values[rows, slots])
    latents = model.perceiver(patches.to(model.perceiver.latents.dtype), positions)
    out = latents.new_zeros(b, n, *latents.shape[1:])
    return out.index_put((rows, slots), latents)


def document_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` index of each token's document in a packed row, from its position ids.

    Transformers' rule (``masking_utils.find_packed_sequence_indices``): a token whose position
    is not its predecessor's plus one starts a new document. Rows of one document give zeros.
    """
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def media_state(
    model: FlamingoModel,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    earlier_latents: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> MediaState | None:
    """Encode the images of a batch and lay out which token sees which image.

    ``earlier_latents`` ``[B, N0, L, D]`` are the images of a cached prefix that
    ``input_ids`` continue: the new images are the sequence's images N0, N0+1, ... both for
    their media-position embeddings and for the layout, exactly as in the whole prompt.
    ``document_ids`` ``[B, T]`` (see :func:`document_ids_from_positions`) packs several
    documents in a row: each document's images count from 0 and only its own tokens see them.
    Padding (``attention_mask`` 0) sees no image. ``None`` when the sequence holds no image.

    Everything that needs the host (image counts, the layout's chunk sizes) is computed from
    the ids before the vision tower runs, so an accelerator's queue is still empty then.
    """
    counts = (input_ids == model.image_token_id).sum(1)
    n_max = int(counts.max()) if counts.numel() else 0
    n_before = 0 if earlier_latents is None else earlier_latents.shape[1]
    if n_max == 0 and n_before == 0:
        return None
    if earlier_latents is not None and document_ids is not None:
        raise ValueError("a packed input (document_ids) cannot continue a cached prefix")
    if n_max:
        if pixel_values is None:
            raise ValueError("input_ids contain <image> tokens but no pixel_values were given")
        if pixel_values.dim() == 5:  # [B, N, C, H, W]: one frame per image
            pixel_values = pixel_values.unsqueeze(2)
        if pixel_values.dim() != 6 or pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"pixel_values must be [B, N_images, F, C, H, W] with B={input_ids.shape[0]}, "
                f"got {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[1] < n_max:
            raise ValueError(
                f"a row has {n_max} <image> tokens but pixel_values holds only "
                f"{pixel_values.shape[1]} images per row"
            )
    n_media = n_before + (pixel_values.shape[1] if n_max else 0)
    layout = MediaLayout.build(input_ids, model.image_token_id, n_media,
                               model.config.media_policy, images_before=n_before,
                               document_ids=document_ids, attention_mask=attention_mask)
    latents = earlier_latents
    if n_max:
        positions = layout.image_positions(input_ids, model.image_token_id)
        model.perceiver.check_positions(positions)
        new = encode_images(model, pixel_values, counts, positions)
        latents = new if earlier_latents is None else torch.cat([earlier_latents, new], dim=1)
    return MediaState(latents, layout)


@dataclass
class PrefixState:
    """Caches of a shared prompt prefix (batch of one), as returned by ``prefill``."""

    past_key_values: object
    attention_mask: torch.Tensor  # [1, P]
    latents: torch.Tensor | None  # [1, N0, L, D] or None without images
    kv_cache: dict  # cross-attention layer index -> (k, v) of the prefix images
    logits: torch.Tensor  # [1, V] next-token logits after the prefix
    # [1, P] the prefix's token ids: logits processors (repetition penalty, n-gram blocking)
    # count them as part of the prompt, as for the whole prompt.
    input_ids: torch.Tensor | None = None


def continue_prefix(
    model: FlamingoModel,
    prefix: PrefixState,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
) -> tuple[object, torch.Tensor, MediaState | None]:
    """Caches of ``prefix`` repeated for each row of ``input_ids``, plus their own images.

    Returns the LM's past key/values (a copy: the prefix stays reusable), the attention mask
    over prefix + input, and the media state in which the prefix's images keep their latents
    and keys/values (only the new images are encoded and projected).
    """
    b = input_ids.shape[0]
    past = copy.deepcopy(prefix.past_key_values)
    past.batch_repeat_interleave(b)
    mask = torch.cat([prefix.attention_mask.expand(b, -1), attention_mask], dim=1)
    earlier = None if prefix.latents is None else prefix.latents.expand(b, -1, -1, -1)
    media = media_state(model, input_ids, pixel_values, earlier_latents=earlier,
                        attention_mask=attention_mask)
    if earlier is not None:  # the prefix images' K/V are reused, only new ones projected
        media.prefix_kv = {i: tuple(t.expand(b, *t.shape[1:]) for t in kv)
                           for i, kv in prefix.kv_cache.items()}
    return past, mask, media
