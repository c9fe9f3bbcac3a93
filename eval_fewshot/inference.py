"""Running prompts through a FlamingoModel: batched generation, prefix reuse, rank scoring.

:class:`FewShotModel` owns the model, its processor and a small cache of preprocessed images
(demonstration images recur across queries). It turns :class:`~eval_fewshot.prompts.Prompt`
objects into left-padded batches, and decoded answers back into strings cut at the end of
their chunk.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
from PIL import Image

from eval_fewshot.prompts import Prompt
from flamingo_kit.backbones import lm_context_length, pooled_features
from flamingo_kit.batching import collate
from flamingo_kit.processing import IMAGE_TOKEN

IMAGE_CACHE_SIZE = 4096


class TokenBoundaryError(ValueError):
    """A query tokenises differently after the shared context than inside the whole prompt.

    Then a prefilled context cannot be reused without changing the model's input; the evaluator
    catches exactly this error and runs such prompts whole.
    """


def cut_answer(text: str, stop_strings: Sequence[str] = ()) -> str:
    """The answer part of a generation: up to a newline or any of ``stop_strings``."""
    pattern = "|".join(["\n", *map(re.escape, stop_strings)])
    return re.split(pattern, text, maxsplit=1)[0].strip()


class FewShotModel:
    """Batched generation and rank classification for few-shot prompts.

    ``max_context`` (tokens) bounds prompt + answer; by default the LM's maximum positions.
    ``generation_config`` (a transformers ``GenerationConfig``) holds generation options for
    every query (``repetition_penalty``, ``no_repeat_ngram_size``, ``stop_strings``, ...);
    the task's ``max_new_tokens`` and ``num_beams`` are passed over it. Options that give more
    or other than one answer per query are refused.
    """

    def __init__(self, model, processor, device: str | torch.device = "cpu",
                 max_context: int | None = None, generation_config=None):
        if generation_config is not None:
            check_one_answer(generation_config)
        self.generation_config = generation_config
        self.model = model.eval().to(device)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = torch.device(device)
        self.max_context = max_context or lm_max_positions(model)
        self._pixels: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._stop_ids = {model.eoc_token_id, self.tokenizer.eos_token_id,
                          self.tokenizer.pad_token_id} - {None}

    # -- inputs -----------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` as a prompt (special tokens included)."""
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def pixels(self, paths: Sequence[str]) -> torch.Tensor:
        """Preprocessed images ``[N, C, H, W]``, cached by path (least recently used out)."""
        missing = [p for p in dict.fromkeys(paths) if p not in self._pixels]
        if missing:
            images = []
            for path in missing:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
            for path, tensor in zip(missing, self.processor.preprocess_images(images)):
                self._pixels[path] = tensor
        for path in paths:
            self._pixels.move_to_end(path)
        while len(self._pixels) > IMAGE_CACHE_SIZE:
            self._pixels.popitem(last=False)
        return torch.stack([self._pixels[p] for p in paths])

    def _batch(self, texts: Sequence[str], images: Sequence[Sequence[str]],
               add_special_tokens: bool = True, side: str = "left") -> dict[str, torch.Tensor]:
        ids = self.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return self._collate(ids, images, side)

    def _collate(self, ids: Sequence[Sequence[int]], images: Sequence[Sequence[str]],
                 side: str = "left") -> dict[str, torch.Tensor]:
        for b, row in enumerate(ids):
            n_tokens = row.count(self.model.image_token_id)
            if n_tokens != len(images[b]):
                raise ValueError(f"prompt {b}: {n_tokens} {IMAGE_TOKEN} tokens but "
                                 f"{len(images[b])} images")
        paths = [path for row in images for path in row]
        pixels = self.pixels(paths) if paths else torch.empty(0)
        batch = collate(ids, pixels.split([len(row) for row in images]),
                        self.tokenizer.pad_token_id, side)
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- generation -------------------------------------------------------------------------

    def _decode(self, new_tokens: torch.Tensor) -> list[str]:
        rows = []
        for row in new_tokens.tolist():
            end = next((i for i, t in enumerate(row) if t in self._stop_ids), len(row))
            rows.append(row[:end])
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int,
                 num_beams: int = 1) -> list[str]:
        """Decoded continuations of whole prompts (one batch), cut at the end of chunk."""
        batch = self._batch([p.text for p in prompts], [p.images for p in prompts])
        return self._decode(self._generate(batch, max_new_tokens, num_beams))

    def _generate(self, batch: dict, max_new_tokens: int, num_beams: int,
                  prefix=None) -> torch.Tensor:
        return self.model.generate(**batch, prefix=prefix, max_new_tokens=max_new_tokens,
                                   num_beams=num_beams, generation_config=self.generation_config,
                                   tokenizer=self.tokenizer)

    def generation_settings(self, max_new_tokens: int, num_beams: int) -> dict:
        """The generation options every query runs with (recorded in the results file)."""
        options = {} if self.generation_config is None else self.generation_config.to_diff_dict()
        options.pop("transformers_version", None)
        return options | {"max_new_tokens": max_new_tokens, "num_beams": num_beams}

    def prefix_ids(
        self, context: str, queries: Sequence[str]
    ) -> tuple[list[int], list[list[int]]]:
        """Token ids of a shared context and of each query continuing it.

        Raises :class:`TokenBoundaryError` when tokenising separately differs from tokenising
        the whole prompt (then prefix reuse would change the model's input).
        """
        prefix = self.tokenizer(context, add_special_tokens=True)["input_ids"]
        rest = self.tokenizer(list(queries), add_special_tokens=False)["input_ids"]
        whole = self.tokenizer([context + q for q in queries], add_special_tokens=True)["input_ids"]
        for q, r, w in zip(queries, rest, whole):
            if prefix + r != w:
                raise TokenBoundaryError(f"query {q!r} does not tokenise the same after the context")
        return prefix, rest

    @torch.no_grad()
    def prefill(self, context: str, context_images: Sequence[str], queries: Sequence[str]):
        """Run the shared context once; returns ``(state, query_ids)`` for :meth:`continue_`."""
        prefix, rest = self.prefix_ids(context, queries)
        batch = self._collate([prefix], [list(context_images)])
        return self.model.prefill(**batch), rest

    @torch.no_grad()
    def generate_after_prefix(self, state, query_ids: Sequence[Sequence[int]],
                              query_images: Sequence[str], max_new_tokens: int,
                              num_beams: int = 1) -> list[str]:
        """Decoded continuations of queries that follow a prefilled context (one batch)."""
        batch = self._collate(query_ids, [[p] for p in query_images])
        return self._decode(self._generate(batch, max_new_tokens, num_beams, prefix=state))

    # -- rank classification ----------------------------------------------------------------

    def _choice_ids(self, prompt_text: str, choices: Sequence[str]) -> tuple[list[int], list]:
        """Prompt ids and, per choice, the ids of `` {choice}<|endofchunk|>`` after it."""
        context = self.tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
        eoc = self.tokenizer.convert_ids_to_tokens(self.model.eoc_token_id)
        wholes = self.tokenizer([f"{prompt_text} {c}{eoc}" for c in choices],
                                add_special_tokens=True)["input_ids"]

        def shared_length(whole: list[int]) -> int:
            return next((i for i, (a, b) in enumerate(zip(context, whole)) if a != b),
                        min(len(context), len(whole)))

        # If a tokenizer merges across the prompt/answer boundary, the context ends where every
        # choice still agrees with it, so all choices are scored after the same context.
        shared = min(shared_length(w) for w in wholes)
        if shared == 0:
            raise ValueError("the prompt tokenises differently once a choice is appended")
        return context[:shared], [w[shared:] for w in wholes]

    @torch.no_grad()
    def rank(self, prompt: Prompt, choices: Sequence[str]) -> list[float]:
        """Length-normalised log-likelihood of each choice as the prompt's answer.

        The prompt (demonstrations, images, query) runs once; every choice then continues from
        its cached state, all choices in one batch.
        """
        context, conts = self._choice_ids(prompt.text, choices)
        n_images = context.count(self.model.image_token_id)
        state = self.model.prefill(**self._collate([context], [prompt.images[:n_images]]))
        cont = self._collate(conts, [prompt.images[n_images:]] * len(conts), side="right")
        logits = self.model(**cont, prefix=state).logits
        # The prefix's last logits score each choice's first token.
        first = state.logits[:, None].expand(len(conts), 1, -1)
        logp = torch.log_softmax(torch.cat([first, logits[:, :-1]], 1).float(), dim=-1)
        token_logp = logp.gather(-1, cont["input_ids"][..., None]).squeeze(-1)
        valid = cont["attention_mask"].float()
        return ((token_logp * valid).sum(1) / valid.sum(1)).tolist()

    # -- image embeddings for RICES ---------------------------------------------------------

    @torch.no_grad()
    def embed_images(self, paths: Sequence[str]) -> torch.Tensor:
        """Vision-tower embeddings ``[N, D]``: the pooled output, else mean patch tokens."""
        tower = self.model.vision.tower
        dtype = next(tower.parameters()).dtype
        out = tower(pixel_values=self.pixels(paths).to(self.device, dtype))
        return pooled_features(out).float().cpu()

    def embedder_name(self) -> str:
        """A fingerprint of the vision tower and image transform (names the RICES cache)."""
        digest = hashlib.sha1(repr(self.processor.image_processor.to_dict()).encode())
        for param in self.model.vision.tower.parameters():
            digest.update(param.detach().float().cpu().numpy().tobytes()[:4096])
        return digest.hexdigest()


def check_one_answer(generation_config) -> None:
    """Refuse generation options that would give other than one answer string per query."""
    refused = [f"{key}={getattr(generation_config, key)!r}"
               for key in ("num_return_sequences", "return_dict_in_generate", "output_scores",
                           "output_logits")
               if getattr(generation_config, key, None) not in (None, False, 1)]
    if refused:
        raise ValueError(f"the evaluator scores one answer per query; remove {', '.join(refused)}")


def lm_max_positions(model) -> int | None:
    """The LM's maximum sequence length from its config, when it declares one."""
    return lm_context_length(model.lm.config)
