"""Generation options the transformers way: a ``GenerationConfig`` in, processors and criteria out.

``generate`` resolves its options as transformers' ``GenerationMixin.generate`` does (keyword
arguments over ``generation_config`` over transformers' global defaults) and builds the same
logits processors and stopping criteria from transformers' own classes, in transformers' order
(``_get_logits_processor``, ``_get_stopping_criteria``): user-supplied processors or criteria
replace a built one of the same class, the others follow the built ones (processors: before the
sampling warpers). Every option set to something other than its default must be one that
flamingo-kit honours (:data:`SUPPORTED`); any other raises, naming it.

Two choices differ from transformers, on purpose:

- The LM's own ``generation_config.json`` does not apply. A Flamingo model is not its LM: an
  instruction-tuned LM that samples by default (``do_sample=True``, ``temperature=0.6``) would
  otherwise switch a k-shot evaluation to sampling. Pass
  ``generation_config=GenerationConfig.from_pretrained(lm_dir)`` to use it on purpose.
- The default stop tokens are ``<|endofchunk|>`` and the LM's EOS, the default pad token the LM's
  pad token (else its EOS, else 0); ``eos_token_id`` / ``pad_token_id`` replace them.

Processors see what they would see in transformers: the whole prompt, left-padded, then the tokens
generated so far. With a cached prefix (``generate(prefix=...)``) the prefix's ids come first, so
repetition penalties and n-gram blocking count the prefix exactly as for the whole prompt.

Reading order: :func:`resolve_config`, :func:`check_supported`, :class:`DecodingPlan`
(``build``, then what the decoding loops call), :func:`build_processors`, :func:`build_criteria`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation import (
    EosTokenCriteria,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    GenerateBeamDecoderOnlyOutput,
    GenerateDecoderOnlyOutput,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessorList,
    MaxLengthCriteria,
    MaxTimeCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    StoppingCriteriaList,
    StopStringCriteria,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from flamingo_kit.media import PrefixState

# GenerationConfig fields that generate honours (any value transformers accepts).
SUPPORTED = frozenset({
    # length and stopping
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "max_time", "stop_strings",
    "eos_token_id", "pad_token_id",
    # strategy
    "do_sample", "num_beams", "num_return_sequences", "length_penalty", "early_stopping",
    # logits processors and warpers
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff",
    "eta_cutoff", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "sequence_bias", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "renormalize_logits",
    # outputs
    "return_dict_in_generate", "output_scores", "output_logits",
    # no effect with a prompt (as in transformers), or already so: never compiled
    "bos_token_id", "disable_compile",
})
# Bookkeeping fields of a GenerationConfig, not options.
METADATA = frozenset({"transformers_version"})


def resolve_config(generation_config: GenerationConfig | None,
                   kwargs: dict[str, Any]) -> tuple[GenerationConfig, bool]:
    """The options of one call: ``kwargs`` over ``generation_config`` over transformers' defaults.

    Returns the config and whether its length is the default one (neither ``max_new_tokens``
    nor ``max_length`` set). Unknown keyword arguments and unsupported options raise.
    """
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError("generation_config must be a transformers.GenerationConfig, got "
                        f"{type(generation_config).__name__}")
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    default_length = (kwargs.get("max_new_tokens") is None and kwargs.get("max_length") is None
                      and config.max_new_tokens is None and config.max_length is None)
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    unknown = config.update(**kwargs)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}: neither "
                        "arguments of FlamingoModel.generate nor GenerationConfig fields")
    check_supported(config)
    for name in ("num_beams", "num_return_sequences"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return config, default_length


def check_supported(config: GenerationConfig) -> None:
    """Raise ``ValueError`` naming every option set to a value ``generate`` cannot honour."""
    defaults = GenerationConfig._get_default_generation_params()

    def unset(key: str, value: Any) -> bool:  # None, the global default, or a flag left off
        return value is None or (value == defaults[key] if key in defaults else value is False)

    refused = {key: value for key, value in vars(config).items()
               if not key.startswith("_") and key not in SUPPORTED | METADATA
               and not unset(key, value)}
    if refused:
        named = ", ".join(f"{key}={value!r}" for key, value in sorted(refused.items()))
        raise ValueError(
            f"FlamingoModel.generate cannot honour {named}. Supported options: "
            f"{', '.join(sorted(SUPPORTED))}; use_cache must stay True (generation always decodes "
            "from its caches)")


@dataclass
class DecodingPlan:
    """What one ``generate`` call decided before decoding, and the per-step work it implies.

    ``prompt_ids`` ``[rows, P]`` is the prompt as transformers would hold it (whole prompt
    including a cached prefix, left-padded; one row per returned sequence or beam); the
    processors and stopping criteria read it followed by the tokens generated so far.
    """

    config: GenerationConfig
    prompt_ids: torch.Tensor
    max_new: int
    processors: LogitsProcessorList
    criteria: StoppingCriteriaList
    stop: torch.Tensor  # ids that end a row
    pad: int
    image_token_id: int
    generator: torch.Generator | None
    streamer: Any = None
    scores: list | None = None  # processed scores per step (output_scores)
    logits: list | None = None  # the model's logits per step, <image> removed (output_logits)

    @classmethod
    def build(cls, model, config: GenerationConfig, default_length: bool,
              input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: PrefixState | None,
              logits_processor: LogitsProcessorList | None,
              stopping_criteria: StoppingCriteriaList | None, tokenizer=None, streamer=None,
              seed: int | None = None) -> DecodingPlan:
        """Prepare special tokens, lengths, processors and criteria as transformers would."""
        device = input_ids.device
        if streamer is not None and config.num_beams > 1:
            raise ValueError("streamer cannot be used with beam search: set num_beams=1")
        stop = torch.tensor(stop_ids(model, config.eos_token_id), dtype=torch.long, device=device)
        pad = config.pad_token_id if config.pad_token_id is not None else default_pad(model)
        config.eos_token_id, config.pad_token_id = stop.tolist(), int(pad)
        ids, mask = whole_prompt(prefix, input_ids, attention_mask)
        rows = max(config.num_beams, config.num_return_sequences)
        ids, mask = ids.repeat_interleave(rows, 0), mask.repeat_interleave(rows, 0)
        prompt_len = ids.shape[1]
        max_positions = getattr(model.lm.config.get_text_config(), "max_position_embeddings", None)
        if config.max_new_tokens is not None:
            config.max_length = prompt_len + config.max_new_tokens
        elif default_length:  # transformers' default: 20 new tokens, within the LM's positions
            config.max_length = prompt_len + config.max_length
            if max_positions is not None:
                config.max_length = min(config.max_length, max_positions)
        if config.max_length <= prompt_len:
            limit = " (the LM's max_position_embeddings)" if default_length else ""
            raise ValueError(f"the prompt has {prompt_len} tokens (cached prefix included) but "
                             f"max_length is {config.max_length}{limit}: nothing to generate")
        if config.min_new_tokens is not None:
            config.min_length = prompt_len + config.min_new_tokens
        # Left padding the processors must not count (as transformers does, from the mask).
        padding = (mask == 0).sum(1) if bool((mask == 0).any()) else None
        processors = build_processors(config, prompt_len, padding, stop, logits_processor)
        criteria = build_criteria(config, max_positions, stop, stopping_criteria, tokenizer)
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        record = config.return_dict_in_generate
        plan = cls(config, ids, config.max_length - prompt_len, processors, criteria, stop,
                   int(pad), model.image_token_id, generator, streamer,
                   [] if record and config.output_scores else None,
                   [] if record and config.output_logits else None)
        if streamer is not None:
            streamer.put(ids.cpu())
        return plan

    # -- per step ---------------------------------------------------------------------------

    def next_scores(self, ids: torch.Tensor, logits: torch.Tensor, log_probs: bool) -> torch.Tensor:
        """Scores of the next token: ``<image>`` removed, log-softmax (beams), then processors.

        ``ids`` are the prompt and tokens so far of each row; ``logits`` the model's logits
        (changed in place).
        """
        logits[:, self.image_token_id] = float("-inf")  # a generated <image> would have no image
        if self.logits is not None:
            self.logits.append(logits.clone())
        if log_probs:
            logits = torch.log_softmax(logits, dim=-1)
        scores = self.processors(ids, logits) if self.processors else logits
        if self.scores is not None:
            self.scores.append(scores.clone() if log_probs else scores)
        return scores

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The next token of each row: argmax, or a sample when ``do_sample``."""
        if not self.config.do_sample:
            return scores.argmax(-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    def stops(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows whose sequence ``ids`` (prompt + new tokens) meets a stopping criterion."""
        return self.criteria(ids, None if self.scores is None else tuple(self.scores))

    def stream(self, tokens: torch.Tensor) -> None:
        """Hand the step's tokens to the streamer, if any."""
        if self.streamer is not None:
            self.streamer.put(tokens.cpu())

    # -- result -----------------------------------------------------------------------------

    def output(self, sequences: torch.Tensor, beams: dict[str, torch.Tensor] | None = None):
        """``sequences``, or transformers' output object when ``return_dict_in_generate``."""
        if self.streamer is not None:
            self.streamer.end()
        if not self.config.return_dict_in_generate:
            return sequences
        scores = None if self.scores is None else tuple(self.scores)
        logits = None if self.logits is None else tuple(self.logits)
        if beams is None:
            return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=logits)
        return GenerateBeamDecoderOnlyOutput(
            sequences=sequences, scores=scores, logits=logits, beam_indices=beams["beam_indices"],
            sequences_scores=beams["sequences_scores"] if self.config.output_scores else None)


def whole_prompt(prefix: PrefixState | None, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask of the whole prompt, left-padded: a cached prefix's ids, then each row's."""
    if prefix is None:
        return input_ids, attention_mask
    if prefix.input_ids is None:
        raise ValueError("this PrefixState holds no input_ids; build it with model.prefill")
    b = input_ids.shape[0]
    ids = torch.cat([prefix.input_ids.to(input_ids.device).expand(b, -1), input_ids], dim=1)
    mask = torch.cat([prefix.attention_mask.to(attention_mask.device).expand(b, -1),
                      attention_mask], dim=1)
    order = mask.sort(dim=1, stable=True).indices  # padding first, tokens in their order
    return ids.gather(1, order), mask.gather(1, order)


def stop_ids(model, eos_token_id) -> list[int]:
    """Ids that end a row: ``eos_token_id``, by default ``<|endofchunk|>`` and the LM's EOS."""
    if eos_token_id is None:
        lm_eos = getattr(model.lm.config.get_text_config(), "eos_token_id", None)
        eos_token_id = [model.eoc_token_id, *(lm_eos if isinstance(lm_eos, list) else [lm_eos])]
    elif isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    return [int(i) for i in eos_token_id if i is not None]


def default_pad(model) -> int:
    """The pad id for finished rows: the LM's pad token, else its EOS, else 0."""
    config = model.lm.config.get_text_config()
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        value = value[0] if isinstance(value, list) else value
        if value is not None:
            return int(value)
    return 0


def build_processors(config: GenerationConfig, prompt_len: int, padding: torch.Tensor | None,
                     eos: torch.Tensor, custom: LogitsProcessorList | None) -> LogitsProcessorList:
    """The logits processors transformers' ``_get_logits_processor`` builds, in its order.

    ``padding``: left-padding length per row (the repetition penalty skips it), or None.
    """
    device = eos.device
    built = LogitsProcessorList()
    if config.sequence_bias is not None:
        built.append(SequenceBiasLogitsProcessor(sequence_bias=config.sequence_bias))
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        built.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty,
                                                      prompt_ignore_length=padding))
    if config.no_repeat_ngram_size is not None and config.no_repeat_ngram_size > 0:
        built.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        built.append(NoBadWordsLogitsProcessor(config.bad_words_ids, eos))
    if config.min_length is not None and config.min_length > 0:
        built.append(MinLengthLogitsProcessor(config.min_length, eos, device=device))
    if config.min_new_tokens is not None and config.min_new_tokens > 0:
        built.append(MinNewTokensLengthLogitsProcessor(prompt_len, config.min_new_tokens, eos,
                                                       device=device))
    if config.forced_bos_token_id is not None:
        built.append(ForcedBOSTokenLogitsProcessor(config.forced_bos_token_id))
    if config.forced_eos_token_id is not None:
        built.append(ForcedEOSTokenLogitsProcessor(config.max_length, config.forced_eos_token_id,
                                                   device=device))
    if config.remove_invalid_values is True:
        built.append(InfNanRemoveLogitsProcessor())
    if config.exponential_decay_length_penalty is not None:
        built.append(ExponentialDecayLengthPenalty(config.exponential_decay_length_penalty, eos,
                                                   prompt_len))
    if config.suppress_tokens is not None:
        built.append(SuppressTokensLogitsProcessor(config.suppress_tokens, device=device))
    if config.begin_suppress_tokens is not None:
        begin = prompt_len if prompt_len > 1 or config.forced_bos_token_id is None else prompt_len + 1
        built.append(SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, begin,
                                                          device=device))
    processors = _merge(built, custom)
    if config.do_sample:  # the warpers, after the user's processors
        keep = eos.numel() + 1 if config.num_beams > 1 else 1  # beams keep a non-stop token
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_h is not None:
            processors.append(TopHLogitsWarper(top_h=config.top_h))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=keep))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=keep))
        if config.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=keep))
        if config.typical_p is not None and config.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=keep))
        if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
            processors.append(EpsilonLogitsWarper(epsilon=config.epsilon_cutoff,
                                                  min_tokens_to_keep=keep))
        if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
            processors.append(EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=keep,
                                              device=device))
    if config.renormalize_logits is True:
        processors.append(LogitNormalization())
    return processors


def build_criteria(config: GenerationConfig, max_positions: int | None, eos: torch.Tensor,
                   custom: StoppingCriteriaList | None, tokenizer=None) -> StoppingCriteriaList:
    """The stopping criteria transformers' ``_get_stopping_criteria`` builds, in its order."""
    built = StoppingCriteriaList([MaxLengthCriteria(max_length=config.max_length,
                                                    max_position_embeddings=max_positions)])
    if config.max_time is not None:
        built.append(MaxTimeCriteria(max_time=config.max_time))
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: generate(..., tokenizer=tokenizer)")
        built.append(StopStringCriteria(stop_strings=config.stop_strings, tokenizer=tokenizer))
    built.append(EosTokenCriteria(eos_token_id=eos))
    return _merge(built, custom)


def _merge(built, custom):
    """transformers' merge: a custom entry replaces a built one of its class; others follow."""
    if not custom:
        return built
    merged = type(built)()
    for item in built:
        same = [c for c in custom if type(c) is type(item)]
        if same:
            warnings.warn(f"the {type(item).__name__} passed to generate replaces the one built "
                          "from the generation options", stacklevel=4)
        merged.append(same[0] if same else item)
    merged.extend(c for c in custom if c not in merged)
    return merged
