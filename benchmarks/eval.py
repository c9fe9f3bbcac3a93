"""Queries/s of an 8-shot VQA evaluation with and without prefix reuse, in one run.

With one demonstration set per trial (``--fixed-demos``), the evaluator runs the 8 demos
(8 images + their text) once through ``model.prefill`` and continues every query from that
cache; without reuse every query re-encodes the whole prompt. Both runs use the same model,
data and demos and must give identical predictions (checked here too).

    python benchmarks/eval.py [--queries 64] [--hidden 256] [--layers 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from eval_fewshot.inference import FewShotModel
from eval_fewshot.runner import EvalConfig, Evaluator
from eval_fewshot.tasks import get_task
from eval_fewshot.toy import build_toy_model, write_toy_eval_sets
from flamingo_kit import FlamingoModel, FlamingoProcessor


def queries_per_second(evaluator: Evaluator) -> tuple[float, list[str]]:
    """Run once (after a warm-up trial) and return queries/s and the raw predictions."""
    evaluator.run_trial(evaluator.queries[:4], 8, seed=0)  # warm-up: kernels, image cache
    start = time.perf_counter()
    result = evaluator.run()[0]
    elapsed = time.perf_counter() - start
    predictions = [r["raw_prediction"] for r in result.trials[0]["predictions"]]
    return len(predictions) / elapsed, predictions


def main() -> None:
    """Parse arguments, build a toy world and model, time both modes, print the ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=64, help="test images (2 questions each)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        world = write_toy_eval_sets(f"{tmp}/world", n_train=32, n_test=args.queries // 2)
        model_dir = build_toy_model(f"{tmp}/model", hidden_size=args.hidden,
                                    num_layers=args.layers, image_size=args.image_size)
        model = FewShotModel(FlamingoModel.from_pretrained(model_dir),
                             FlamingoProcessor.from_pretrained(model_dir), args.device)
        task = get_task("synth_vqa", num_beams=args.num_beams)
        data = task.load(world)
        speeds = {}
        for reuse in (False, True):
            config = EvalConfig(shots=[8], trials=1, fixed_demos=True, prefix_reuse=reuse,
                                batch_size=args.batch_size)
            speeds[reuse] = queries_per_second(Evaluator(task, data, model, config))
    (slow, slow_preds), (fast, fast_preds) = speeds[False], speeds[True]
    print(f"8-shot synth_vqa, {len(slow_preds)} queries, hidden {args.hidden}, "
          f"{args.layers} layers, {args.image_size}px, batch {args.batch_size}, "
          f"beams {args.num_beams}, {args.device}")
    print(f"  whole prompts : {slow:8.2f} queries/s")
    print(f"  prefix reuse  : {fast:8.2f} queries/s")
    print(f"  ratio         : {fast / slow:8.2f}x  (identical predictions: "
          f"{slow_preds == fast_preds})")


if __name__ == "__main__":
    main()
