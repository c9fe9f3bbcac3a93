"""Generation with three caches: the LM's KV cache, image latents, and cross-attention K/V.

One ``generate`` call encodes each image once (before beams are expanded), projects each cross-
attention layer's image keys/values once, and then decodes token by token from the LM's KV
cache. ``prefill`` computes all of that for a shared prefix (e.g. k demonstrations) so many
queries can continue from it without recomputing it. Images and media state come from
``media.py``; every step is a plain ``FlamingoModel.forward`` call.

Reading order: ``GenerationMixin.generate`` (prompt forward, then a decoding strategy),
``_Decoding`` (per-row caches, one step), ``_sample``, ``_beam_search``, then ``prefill``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flamingo_kit.lm_integration import flamingo_layers
from flamingo_kit.media import MediaState, PrefixState, continue_prefix, media_state


class GenerationMixin:
    """``generate`` and ``prefill`` for :class:`~flamingo_kit.FlamingoModel`."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        length_penalty: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        prefix: PrefixState | None = None,
        return_prompt: bool = False,
        seed: int | None = None,
        early_stopping: bool | str = False,
    ) -> torch.Tensor:
        """Continue left-padded prompts; returns the new token ids ``[B, n_new]``.

        Stops a row at ``<|endofchunk|>`` or the LM's EOS (or ``eos_token_id``); finished rows
        are filled with ``pad_token_id``. ``seed`` makes sampling reproducible. Beam search
        (``num_beams > 1``) follows transformers: ``length_penalty`` and ``early_stopping``
        (``True``, ``False`` or ``"never"``) mean what they mean there, with the same defaults.
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if not (isinstance(early_stopping, bool) or early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        if num_beams > 1 and do_sample:
            raise ValueError("choose beam search (num_beams > 1) or sampling, not both")
        was_training = self.training
        if was_training:
            self.eval()
        try:
            stop = _stop_ids(self, eos_token_id).to(input_ids.device)
            pad = pad_token_id if pad_token_id is not None else _default_pad(self)
            state = _Decoding.after_prompt(self, input_ids, attention_mask, pixel_values, prefix)
            if num_beams > 1:
                new = _beam_search(self, state, num_beams, max_new_tokens, stop, pad,
                                   length_penalty, early_stopping)
            else:
                generator = None
                if seed is not None:
                    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
                sampler = _Sampler(do_sample, temperature, top_p, top_k, generator)
                new = _sample(self, state, max_new_tokens, stop, pad, sampler)
        finally:
            if was_training:
                self.train()
        return torch.cat([input_ids, new], dim=1) if return_prompt else new

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> PrefixState:
        """Run a shared prefix (batch of one) once; pass the result as ``generate(prefix=...)``
        or ``forward(prefix=...)``."""
        if input_ids.shape[0] != 1:
            raise ValueError(f"prefill takes one shared prefix (batch of 1), got {input_ids.shape[0]}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        media = media_state(self, input_ids, pixel_values)
        out = self(input_ids=input_ids, attention_mask=attention_mask, media=media,
                   use_cache=True, logits_to_keep=1)
        if media is not None:  # every layer's K/V, also those no prefix token needed
            for layer in flamingo_layers(self.lm):
                media.media_kv(layer.xattn_index, layer.xattn)
        return PrefixState(out.past_key_values, attention_mask,
                           None if media is None else media.latents,
                           {} if media is None else media.kv_cache, out.logits[:, -1])


@dataclass
class _Decoding:
    """Per-row caches and next-token logits shared by the decoding strategies."""

    past_key_values: object
    attention_mask: torch.Tensor
    media: MediaState | None
    logits: torch.Tensor  # [B, V] next-token logits after the prompt

    @classmethod
    def after_prompt(cls, model, input_ids, attention_mask, pixel_values, prefix) -> _Decoding:
        """Run the (left-padded) prompts, after ``prefix`` if given, keeping every cache."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("prompts must be left-padded for generation "
                             "(processor(..., padding_side='left'))")
        past = None
        if prefix is not None:
            past, attention_mask, media = continue_prefix(
                model, prefix, input_ids, attention_mask, pixel_values
            )
        else:
            media = media_state(model, input_ids, pixel_values)
        out = model(input_ids=input_ids, attention_mask=attention_mask, media=media,
                    past_key_values=past, use_cache=True, logits_to_keep=1)
        return cls(out.past_key_values, attention_mask,
                   None if media is None else media.for_decoding(), out.logits[:, -1].float())

    def expand(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (beams), without recomputing anything."""
        self.past_key_values.batch_repeat_interleave(repeats)
        self.attention_mask = self.attention_mask.repeat_interleave(repeats, 0)
        self.logits = self.logits.repeat_interleave(repeats, 0)
        if self.media is not None:
            self.media = self.media.repeated(repeats)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the rows ``rows`` in that order (beam search's surviving beams)."""
        self.past_key_values.reorder_cache(rows)
        self.attention_mask = self.attention_mask[rows]

    def step(self, model, tokens: torch.Tensor) -> None:
        """Feed one new token per row; updates caches and next-token logits in place."""
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones(tokens.shape[0], 1)], dim=1
        )
        out = model(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                    media=self.media, past_key_values=self.past_key_values, use_cache=True)
        self.past_key_values = out.past_key_values
        self.logits = out.logits[:, -1].float()


def _stop_ids(model, eos_token_id) -> torch.Tensor:
    """Ids that end a row: ``eos_token_id``, by default ``<|endofchunk|>`` and the LM's EOS."""
    if eos_token_id is None:
        eos_token_id = [model.eoc_token_id]
        lm_eos = getattr(model.lm.config.get_text_config(), "eos_token_id", None)
        eos_token_id += lm_eos if isinstance(lm_eos, list) else [lm_eos]
    elif isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    return torch.tensor([i for i in eos_token_id if i is not None])


def _default_pad(model) -> int:
    """The pad id for finished rows: the LM's pad token, else its EOS, else 0."""
    config = model.lm.config.get_text_config()
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        value = value[0] if isinstance(value, list) else value
        if value is not None:
            return int(value)
    return 0


def _suppress(logits: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """A generated ``<image>`` would have no image: never emit it."""
    logits[:, image_token_id] = float("-inf")
    return logits


def _sample(model, state: _Decoding, max_new: int, stop, pad: int, sampler) -> torch.Tensor:
    """Greedy or sampled decoding: one token per row and step until every row has stopped."""
    b = state.logits.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=state.logits.device)
    out = []
    for step in range(max_new):
        token = sampler(_suppress(state.logits, model.image_token_id))
        token = token.masked_fill(done, pad)
        out.append(token)
        done |= torch.isin(token, stop)
        if bool(done.all()) or step == max_new - 1:
            break
        state.step(model, token)
    return torch.stack(out, dim=1)


def _beam_search(model, state: _Decoding, num_beams: int, max_new: int, stop: torch.Tensor,
                 pad: int, length_penalty: float, early_stopping: bool | str) -> torch.Tensor:
    """Beam search with the semantics of transformers' ``GenerationMixin._beam_search``.

    Each row keeps ``num_beams`` running hypotheses (ranked by summed log-probability) and
    its ``num_beams`` best finished ones, scored ``sum_logprob / n_new ** length_penalty``
    where ``n_new`` counts the new tokens including the stop token. Only candidates among the
    step's top ``num_beams`` may finish. A row takes no more finished hypotheses once it is
    done: with ``early_stopping=True`` when it holds ``num_beams`` of them, otherwise when
    its best running hypothesis can no longer beat its worst finished one (at its current
    length, or at ``max_new`` with ``"never"`` and a positive ``length_penalty``). Every
    flag is per row, so a row's answer does not depend on the other rows of the batch; the
    loop ends when every row is done, or at ``max_new`` tokens.
    """
    b, k = state.logits.shape[0], num_beams
    device = state.logits.device
    state.expand(k)
    keep = max(2, 1 + stop.numel()) * k  # enough candidates that k of them do not stop
    may_finish = torch.arange(keep, device=device) < k
    row_offset = torch.arange(b, device=device)[:, None] * k
    running = torch.full((b, k, max_new), pad, dtype=torch.long, device=device)
    running_scores = torch.zeros(b, k, device=device)
    running_scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    finished, finished_scores = running.clone(), torch.full((b, k), -1e9, device=device)
    finished_len = torch.zeros(b, k, dtype=torch.long, device=device)
    is_finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    may_improve = torch.ones(b, 1, dtype=torch.bool, device=device)
    for step in range(max_new):
        logp = torch.log_softmax(_suppress(state.logits, model.image_token_id), dim=-1)
        vocab = logp.shape[-1]
        cand = (logp.view(b, k, vocab) + running_scores[..., None]).view(b, k * vocab)
        top_scores, top_idx = cand.topk(keep, dim=1)
        parent = top_idx // vocab
        seqs = _take(running, parent)
        seqs[:, :, step] = top_idx % vocab
        ends = torch.isin(seqs[:, :, step], stop) | (step == max_new - 1)

        # The best k candidates that do not end keep running.
        alive_scores = top_scores + ends.float() * -1e9
        pick = alive_scores.topk(k, dim=1).indices
        running, running_scores = _take(seqs, pick), _take(alive_scores, pick)
        beam_rows = (_take(parent, pick) + row_offset).view(-1)

        # Candidates that end now join the finished ones if they are among the best k.
        scores = top_scores / ((step + 1) ** length_penalty)
        full = is_finished.all(1, keepdim=True) & (early_stopping is True)
        scores = scores + full.float() * -1e9
        scores = scores + (~may_improve).float() * -1e9
        just_finished = ends & may_finish
        scores = scores + (~just_finished).float() * -1e9
        merged = torch.cat([finished_scores, scores], 1)
        order = merged.topk(k, dim=1).indices
        finished = _take(torch.cat([finished, seqs], 1), order)
        finished_scores = _take(merged, order)
        lengths = torch.full_like(top_idx, step + 1)
        finished_len = _take(torch.cat([finished_len, lengths], 1), order)
        is_finished = _take(torch.cat([is_finished, just_finished], 1), order)

        # Can a row's running beams still beat its finished ones?
        hypothetical = step + 1
        if early_stopping == "never" and length_penalty > 0:
            hypothetical = max_new
        best_running = running_scores[:, :1] / (hypothetical ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True).values,
                                     -1e9)
        may_improve = may_improve & (best_running > worst_finished).any(1, keepdim=True)
        done = ~may_improve.any() | ends.all()
        if early_stopping is True:
            done = done | is_finished.all()
        if bool(done):  # one host sync per step
            break
        state.reorder(beam_rows)
        state.step(model, running[:, :, step].reshape(-1))
    return finished[:, 0, : int(finished_len[:, 0].max())]


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, index[b, j], ...]``: gather along the beam dimension (dim 1)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


class _Sampler:
    """Greedy choice or temperature / top-k / top-p sampling of the next token."""

    def __init__(self, do_sample, temperature, top_p, top_k, generator):
        if do_sample and temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        if not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        self.do_sample, self.temperature, self.top_p, self.top_k = do_sample, temperature, top_p, top_k
        self.generator = generator

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_k > 0:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= self.top_p  # keep the token crossing top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
