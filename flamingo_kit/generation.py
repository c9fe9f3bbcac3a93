"""Generation with three caches: the LM's KV cache, image latents, and cross-attention K/V.

One ``generate`` call encodes each image once (before beams or returned sequences are expanded),
projects each cross-attention layer's image keys/values once, and then decodes token by token
from the LM's KV cache. Its options, logits processors and stopping criteria are transformers'
(built in ``generation_options.py``). ``prefill`` computes all of that for a shared prefix
(e.g. k demonstrations) so many queries can continue from it without recomputing it. Images and
media state come from ``media.py``; every step is a plain ``FlamingoModel.forward`` call.

Reading order: ``GenerationMixin.generate`` (options, prompt forward, then a decoding strategy),
``_Decoding`` (per-row caches, one step), ``_sample``, ``_beam_search``, then ``prefill``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation import (
    GenerateBeamDecoderOnlyOutput,
    GenerateDecoderOnlyOutput,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from flamingo_kit.generation_options import DecodingPlan, resolve_config
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
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer: Any = None,
        prefix: PrefixState | None = None,
        return_prompt: bool = False,
        seed: int | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """Continue left-padded prompts; returns the new token ids ``[B * n, n_new]``.

        Options are transformers' (see ``generation_options``): ``generation_config`` and
        ``GenerationConfig`` fields as keyword arguments (``max_new_tokens`` (default 20),
        ``num_beams``, ``do_sample``, ``temperature``, ``top_k`` (default 50, as in
        transformers), ``top_p``, ``repetition_penalty``, ``no_repeat_ngram_size``,
        ``min_new_tokens``, ``bad_words_ids``, ``num_return_sequences`` (n), ``stop_strings``
        (with ``tokenizer=``), ``length_penalty``, ``early_stopping``, ``output_scores``,
        ``return_dict_in_generate``, ...), built into transformers' own processors and stopping
        criteria; ``logits_processor`` / ``stopping_criteria`` add to them as in transformers;
        ``streamer`` (``TextStreamer``, ``TextIteratorStreamer``) receives the prompt, then each
        new token (batch of one, no beams). An option it cannot honour raises, naming it.

        A row stops at ``<|endofchunk|>`` or the LM's EOS (or ``eos_token_id``), at a stop
        string or at ``max_new_tokens``; finished rows are filled with ``pad_token_id``.
        ``<image>`` is never generated. ``prefix`` continues a :meth:`prefill` state exactly as
        the whole prompt would. ``seed`` makes sampling reproducible (else torch's global RNG,
        as transformers). ``return_prompt=True`` puts ``input_ids`` before the new tokens. With
        ``return_dict_in_generate=True`` the result is transformers'
        ``GenerateDecoderOnlyOutput`` / ``GenerateBeamDecoderOnlyOutput`` whose ``sequences``
        are what would be returned otherwise (``scores``, ``logits``, ``beam_indices``,
        ``sequences_scores`` as in transformers, ``logits`` with ``<image>`` removed; no attentions,
        hidden states or cache).
        """
        config, default_length = resolve_config(generation_config, kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("prompts must be left-padded for generation "
                             "(processor(..., padding_side='left'))")
        was_training = self.training
        if was_training:
            self.eval()
        try:
            plan = DecodingPlan.build(self, config, default_length, input_ids, attention_mask,
                                      prefix, logits_processor, stopping_criteria, tokenizer,
                                      streamer, seed)
            state = _Decoding.after_prompt(self, input_ids, attention_mask, pixel_values, prefix)
            beams = None
            if config.num_beams > 1:
                new, beams = _beam_search(self, state, plan)
            else:
                if config.num_return_sequences > 1:
                    state.expand(config.num_return_sequences)
                new = _sample(self, state, plan)
        finally:
            if was_training:
                self.train()
        if return_prompt:
            rows = new.shape[0] // input_ids.shape[0]
            new = torch.cat([input_ids.repeat_interleave(rows, 0), new], dim=1)
        return plan.output(new, beams)

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
                           {} if media is None else media.kv_cache, out.logits[:, -1], input_ids)


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


def _sample(model, state: _Decoding, plan: DecodingPlan) -> torch.Tensor:
    """Greedy or sampled decoding (transformers' ``_sample``): one token per row and step.

    Each step: processed scores -> token (argmax or sample) -> finished rows get ``pad`` ->
    stopping criteria on prompt + tokens; ends when every row has stopped.
    """
    ids = plan.prompt_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    while True:
        token = plan.choose(plan.next_scores(ids, state.logits, log_probs=False))
        token = token.masked_fill(done, plan.pad)
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= plan.stops(ids)
        plan.stream(token)
        if bool(done.all()):  # one host sync per step
            break
        state.step(model, token)
    return ids[:, plan.prompt_ids.shape[1]:]


def _beam_search(model, state: _Decoding, plan: DecodingPlan) -> tuple[torch.Tensor, dict]:
    """Beam search with the semantics of transformers' ``GenerationMixin._beam_search``.

    Each row keeps ``num_beams`` running hypotheses (ranked by summed processed
    log-probability) and its ``num_beams`` best finished ones, scored ``sum_logprob / n_new **
    length_penalty`` where ``n_new`` counts the new tokens including the last one. A candidate
    finishes when it meets a stopping criterion (stop token, stop string, length...); only
    candidates among the step's top ``num_beams`` may join the finished ones. A row takes no
    more finished hypotheses once it is done: with ``early_stopping=True`` when it holds
    ``num_beams`` of them, otherwise when its best running hypothesis can no longer beat its
    worst finished one (at its current length, or at ``max_new`` with ``"never"`` and a
    positive ``length_penalty``). Every flag is per row, so a row's answer does not depend on
    the other rows of the batch; the loop ends when every row is done, or at ``max_new``
    tokens. With ``do_sample`` the candidates are sampled (transformers' beam sampling).
    Returns the best ``num_return_sequences`` hypotheses of each row ``[B * n, n_new]`` and
    their ``sequences_scores`` and ``beam_indices``.
    """
    config = plan.config
    b, k, max_new = state.logits.shape[0], config.num_beams, plan.max_new
    length_penalty, early_stopping = config.length_penalty, config.early_stopping
    device = state.logits.device
    state.expand(k)
    keep = max(2, 1 + plan.stop.numel()) * k  # enough candidates that k of them do not stop
    may_finish = torch.arange(keep, device=device) < k
    row_offset = torch.arange(b, device=device)[:, None] * k
    prompt = plan.prompt_ids  # [b * k, P]: every beam of a row holds the row's prompt
    prompt_of_candidates = prompt.view(b, k, -1)[:, :1].expand(-1, keep, -1).reshape(b * keep, -1)
    running = torch.full((b, k, max_new), plan.pad, dtype=torch.long, device=device)
    origin = torch.full((b, k, max_new), -1, dtype=torch.long, device=device)  # beam_indices
    running_scores = torch.zeros(b, k, device=device)
    running_scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    finished, finished_origin = running.clone(), origin.clone()
    finished_scores = torch.full((b, k), -1e9, device=device)
    finished_len = torch.zeros(b, k, dtype=torch.long, device=device)
    is_finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    may_improve = torch.ones(b, 1, dtype=torch.bool, device=device)
    for step in range(max_new):
        ids = torch.cat([prompt, running[:, :, :step].reshape(b * k, step)], dim=1)
        logp = plan.next_scores(ids, state.logits, log_probs=True)
        vocab = logp.shape[-1]
        cand = (logp.view(b, k, vocab) + running_scores[..., None]).view(b, k * vocab)
        if config.do_sample:
            top_idx = torch.multinomial(cand.softmax(-1), keep, generator=plan.generator)
            top_scores = cand.gather(1, top_idx)
        else:
            top_scores, top_idx = cand.topk(keep, dim=1)
        parent = top_idx // vocab
        seqs, seq_origin = _take(running, parent), _take(origin, parent)
        seqs[:, :, step] = top_idx % vocab
        seq_origin[:, :, step] = parent + row_offset
        candidates = torch.cat([prompt_of_candidates, seqs[:, :, : step + 1].reshape(b * keep, -1)], 1)
        ends = plan.stops(candidates).view(b, keep) | (step == max_new - 1)

        # The best k candidates that do not end keep running.
        alive_scores = top_scores + ends.float() * -1e9
        pick = alive_scores.topk(k, dim=1).indices
        running, origin, running_scores = (_take(seqs, pick), _take(seq_origin, pick),
                                           _take(alive_scores, pick))
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
        finished_origin = _take(torch.cat([finished_origin, seq_origin], 1), order)
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
    n = config.num_return_sequences
    length = int(finished_len[:, :n].max())
    return finished[:, :n, :length].reshape(b * n, length), {
        "sequences_scores": finished_scores[:, :n].reshape(-1),
        "beam_indices": finished_origin[:, :n, :length].reshape(b * n, length)}


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, index[b, j], ...]``: gather along the beam dimension (dim 1)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)
