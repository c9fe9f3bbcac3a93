"""Queries/s of an 8-shot VQA evaluation with and without prefix reuse, in one run.

With one demonstration set per trial (``--fixed-demos``), the evaluator runs the 8 demos
(8 images + their text) once through ``model.prefill`` and continues every query from that
cache; without reuse every query re-encodes the whole prompt. Both runs use the same model,
data and demos and must give identical predictions (checked here too). Each mode runs once
untimed first (kernels, and the image cache both modes share), then the two alternate in every
repeat and the median is kept.

    python -m benchmarks.eval [--queries 64] [--hidden 256] [--layers 4] [--threads 1]

Shared flags (``benchmarks.common.benchmark_parser``): ``--threads``, ``--seed``, ``--smoke``,
``--device``, ``--dtype``, ``--repeats`` (default 1 here: one run is 64 queries). The
matched-model flags do not apply: the model is the evaluation toy's (``eval_fewshot.toy``).
"""

from __future__ import annotations

import tempfile

from benchmarks.common import (
    DTYPES,
    benchmark_parser,
    device_of,
    interleaved_medians,
    setup_process,
    warm_up,
)
from eval_fewshot.inference import FewShotModel
from eval_fewshot.runner import EvalConfig, Evaluator
from eval_fewshot.tasks import get_task
from eval_fewshot.toy import build_toy_model, write_toy_eval_sets
from flamingo_kit import FlamingoModel, FlamingoProcessor

MODES = {"whole prompts": False, "prefix reuse": True}
SHOTS = 8


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Build a toy world and model, time both modes, print and return queries/s per mode."""
    parser = benchmark_parser(__doc__, matched=False)
    parser.add_argument("--queries", type=int, default=64, help="test images x 2 questions")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.set_defaults(repeats=1)
    args = parser.parse_args(argv)
    if args.smoke:
        args.queries, args.hidden, args.layers, args.image_size = 4, 32, 1, 32
    device, threads = device_of(args), setup_process(args)
    with tempfile.TemporaryDirectory() as tmp:
        world = write_toy_eval_sets(f"{tmp}/world", seed=args.seed, n_train=4 * SHOTS,
                                    n_test=args.queries // 2)
        model_dir = build_toy_model(f"{tmp}/model", seed=args.seed, hidden_size=args.hidden,
                                    num_layers=args.layers, image_size=args.image_size)
        model = FewShotModel(FlamingoModel.from_pretrained(model_dir, dtype=DTYPES[args.dtype]),
                             FlamingoProcessor.from_pretrained(model_dir), device)
        task = get_task("synth_vqa", num_beams=args.num_beams)
        data = task.load(world)
        runs = {}
        for mode, reuse in MODES.items():
            config = EvalConfig(shots=[SHOTS], trials=1, seed=args.seed, fixed_demos=True,
                                prefix_reuse=reuse, batch_size=args.batch_size)
            runs[mode] = Evaluator(task, data, model, config).run
        results = warm_up(runs, 1)
        seconds = interleaved_medians(runs, device, args.repeats)
    predictions = {mode: [r["raw_prediction"] for r in result[0].trials[0]["predictions"]]
                   for mode, result in results.items()}
    n = len(predictions["whole prompts"])
    rates = {mode: n / seconds[mode] for mode in MODES}
    print(f"{SHOTS}-shot synth_vqa, {n} queries, hidden {args.hidden}, {args.layers} layers, "
          f"{args.image_size}px, batch {args.batch_size}, beams {args.num_beams}, {device}, "
          f"threads {threads}, repeats {args.repeats} (median)")
    for mode, rate in rates.items():
        print(f"  {mode:<14}: {rate:8.2f} queries/s")
    identical = predictions["whole prompts"] == predictions["prefix reuse"]
    print(f"  ratio         : {rates['prefix reuse'] / rates['whole prompts']:8.2f}x  "
          f"(identical predictions: {identical})")
    return {**rates, "identical": identical}


if __name__ == "__main__":
    main()
