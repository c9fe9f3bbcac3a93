"""``flamingo-eval``: k-shot evaluation of a saved FlamingoModel on one task.

Example::

    flamingo-eval --model runs/x/final --task synth_vqa --data data/synth \\
        --shots 0,4,8,16,32 --trials 3 --out results/

prints a shots x metrics table (mean ± std) and writes ``RESULTS.json`` (settings, scores of
every trial, every prediction) and ``RESULTS.png`` (score vs shots), where ``RESULTS`` is
``{out}/{task}`` by default. Real benchmarks take their file locations from ``--data`` and the
task's reader options (see :mod:`eval_fewshot.tasks`), overridable with ``--task-config
FILE.yaml`` and ``--option key=value``.

Distributed: launch with ``torchrun --nproc_per_node N -m eval_fewshot ...`` or
``deepspeed --num_gpus N --module eval_fewshot ...`` (its ``--local_rank`` is accepted and
ignored: the rank comes from the environment the launcher also sets); queries are split over
ranks and rank 0 writes the outputs.

Bad arguments and unreadable or malformed data files stop the command with a one-line error
that names the argument or file (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

import torch


def parse_shots(text: str) -> list[int]:
    """``"0,4,8"`` -> ``[0, 4, 8]`` (non-negative, no duplicates)."""
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shots takes comma-separated integers, got {text!r}"
        ) from None
    if not shots or any(s < 0 for s in shots) or len(set(shots)) != len(shots):
        raise argparse.ArgumentTypeError(f"--shots needs distinct integers >= 0, got {text!r}")
    return shots


def positive_int(text: str) -> int:
    """An integer >= 1 (argument type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs an integer >= 1, got {text!r}")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block): ``prog: error: ...``."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` on one line to stderr and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    from eval_fewshot.metrics.text import CAPTION_TOKENIZERS
    from eval_fewshot.metrics.vqa import VQA_MODES
    from eval_fewshot.tasks import task_names

    p = OneLineErrorParser(prog="flamingo-eval", description=__doc__.split("\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="directory written by save_pretrained "
                   "(model and processor)")
    p.add_argument("--task", required=True, choices=task_names())
    p.add_argument("--data", help="dataset directory (synthetic world root for synth_* tasks)")
    p.add_argument("--shots", type=parse_shots, default=[0, 4, 8, 16, 32])
    p.add_argument("--trials", type=positive_int, default=3, help="seeds per shot count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rices", action="store_true", help="choose demos by image similarity")
    p.add_argument("--fixed-demos", action="store_true",
                   help="one demo set per trial, shared by all queries (reuses its KV cache)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="with --fixed-demos, still run every prompt whole")
    p.add_argument("--limit", type=positive_int,
                   help="evaluate a seeded random subset of N queries")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--num-beams", type=positive_int, help="override the task's beam count")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="override the task's answer length")
    p.add_argument("--max-context", type=positive_int,
                   help="token budget of a prompt (default: LM's); prompts drop their oldest "
                   "demonstrations to fit, which the table's 'used' column shows")
    p.add_argument("--generation-config", metavar="FILE.json",
                   help="transformers GenerationConfig fields as a JSON object, e.g. "
                   '{"repetition_penalty": 1.2, "no_repeat_ngram_size": 3}; --num-beams and '
                   "--max-new-tokens override its values, its values the task's")
    p.add_argument("--strict-shots", action="store_true",
                   help="fail instead of warning when a prompt holds fewer shots than asked")
    p.add_argument("--vqa-mode", choices=VQA_MODES,
                   help="VQA accuracy: 'official' (default; GT-Vision-Lab vqaEval.py, answers "
                   "processed only when the ten humans disagree) or 'normalize_all' (every "
                   "answer processed, as OpenFlamingo's metric); also a task-config key")
    p.add_argument("--caption-tokenizer", choices=CAPTION_TOKENIZERS,
                   help="PTB tokenizer of CIDEr-D/BLEU: 'python' (default; our tokenizer, the "
                   "tokens of the Java one pycocoevalcap runs on captions) or 'java' (that "
                   "tokenizer itself; needs java and pycocoevalcap); also a task-config key")
    p.add_argument("--template", help="demonstration template, e.g. "
                   "'<image>Q: {question} A: {answer}<|endofchunk|>'")
    p.add_argument("--task-config", help="YAML/JSON file of reader options (and 'template')")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option override, repeatable")
    p.add_argument("--out", default="eval_results", help="output directory")
    p.add_argument("--name", help="output file stem (default: the task name)")
    p.add_argument("--rices-cache", help="directory of cached RICES embeddings "
                   "(default: OUT/rices_cache)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    return p


def reader_options(args: argparse.Namespace) -> tuple[dict, dict]:
    """Reader options from ``--task-config`` then ``--option``, and the task settings found
    there (``template``, ``vqa_mode``, ``caption_tokenizer``), which the command-line flags
    override."""
    from omegaconf import OmegaConf

    conf = OmegaConf.create({})
    if args.task_config:
        try:
            conf = OmegaConf.load(args.task_config)
        except Exception as error:  # a YAML/JSON parse error of any kind
            raise ValueError(f"--task-config {args.task_config}: {error}".replace("\n", " ")) \
                from None
    if args.option:
        bad = [o for o in args.option if "=" not in o]
        if bad:
            raise ValueError(f"--option takes KEY=VALUE, got {bad}")
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(args.option))
    options = OmegaConf.to_container(conf, resolve=True)
    settings = {key: options.pop(key, None)
                for key in ("template", "vqa_mode", "caption_tokenizer")}
    for key in settings:
        if getattr(args, key):
            settings[key] = getattr(args, key)
    return options, settings


def read_generation_config(path: str | None):
    """The ``GenerationConfig`` in JSON file ``path`` (None without one), checked before any
    model work: a missing or malformed file, an unknown field or an option ``generate``
    cannot honour raises ``ValueError`` naming the file and the field."""
    if path is None:
        return None
    from transformers import GenerationConfig

    from eval_fewshot.inference import check_one_answer
    from flamingo_kit.generation_options import check_supported

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--generation-config {path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--generation-config {path} is not a JSON file ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--generation-config {path} must hold a JSON object of "
                         "GenerationConfig fields")
    unknown = sorted(set(data) - set(vars(GenerationConfig())) - {"_from_model_config"})
    if unknown:
        raise ValueError(f"--generation-config {path}: unknown GenerationConfig fields {unknown}")
    try:
        config = GenerationConfig(**data)
        check_supported(config)
        check_one_answer(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--generation-config {path}: {error}") from None
    return config


def init_distributed(device: str) -> None:
    """Join the process group a launcher (torchrun, deepspeed) describes in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``flamingo-eval``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from flamingo_kit.backbones import require_local_dir

    try:  # before anything loads it: a bare name would be looked up on a model hub
        require_local_dir(args.model, "--model", "config.json")
    except FileNotFoundError as error:
        parser.error(str(error))
    from eval_fewshot.datasets import DataFormatError, TemplateError
    from eval_fewshot.inference import FewShotModel
    from eval_fewshot.report import format_table, plot_scores, write_json
    from eval_fewshot.runner import EvalConfig, Evaluator, ShotsError, results_to_json
    from eval_fewshot.tasks import get_task
    from flamingo_kit import FlamingoModel, FlamingoProcessor
    from flamingo_kit.distributed import DistInfo

    # Everything read from the command line and the data files is checked before any model
    # work; what is wrong there ends the run with one line, not a traceback.
    try:
        options, settings = reader_options(args)
        generation = read_generation_config(args.generation_config)
        task = get_task(args.task, settings.pop("template"),
                        num_beams=args.num_beams or getattr(generation, "num_beams", None),
                        max_new_tokens=args.max_new_tokens
                        or getattr(generation, "max_new_tokens", None), **settings)
        data = task.load(args.data, options)
    except (DataFormatError, TemplateError, FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    init_distributed(args.device)
    dist = DistInfo.current()
    device = args.device
    if device == "cuda" and dist.world_size > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    model = FlamingoModel.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    processor = FlamingoProcessor.from_pretrained(args.model)
    runner_model = FewShotModel(model, processor, device, args.max_context, generation)
    if generation is not None and generation.do_sample:
        torch.manual_seed(args.seed)  # sampled answers are reproducible
    stem = os.path.join(args.out, args.name or task.name)
    config = EvalConfig(
        shots=args.shots, trials=args.trials, seed=args.seed,
        selection="rices" if args.rices else None, fixed_demos=args.fixed_demos,
        prefix_reuse=not args.no_prefix_reuse, batch_size=args.batch_size, limit=args.limit,
        rices_cache_dir=args.rices_cache or os.path.join(args.out, "rices_cache"),
        strict_shots=args.strict_shots,
    )
    try:
        results = Evaluator(task, data, runner_model, config, dist).run()
    except ShotsError as error:
        parser.exit(1, f"{parser.prog}: error: {error} (--strict-shots)\n")
    if dist.rank == 0:
        summary = results_to_json(task, config, results, model=os.path.abspath(args.model),
                                  data=args.data, reader_options=options,
                                  template=task.template.text,
                                  generation=runner_model.generation_settings(
                                      task.max_new_tokens, task.num_beams))
        for result in results:
            shortfall = result.shortfall(runner_model.max_context)
            if shortfall:
                print(f"{parser.prog}: warning: {shortfall}", file=sys.stderr)
        print(format_table(summary))
        write_json(summary, stem + ".json")
        plot_scores(summary, stem + ".png")
        print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
