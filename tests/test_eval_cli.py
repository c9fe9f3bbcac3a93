"""End to end: `flamingo-eval` on a tiny untrained model and toy datasets in the real formats."""

import json
import os

import pytest

from eval_fewshot import cli
from eval_fewshot.runner import Distributed, EvalConfig, Evaluator
from eval_fewshot.tasks import get_task, task_names
from eval_fewshot.toy import build_toy_model, write_toy_eval_sets


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_cli")
    return write_toy_eval_sets(str(root / "world")), build_toy_model(str(root / "model"))


def run_cli(capsys, *args):
    assert cli.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_cli_writes_table_json_and_png(toy, tmp_path, capsys):
    world, model = toy
    out = run_cli(capsys, "--model", model, "--task", "synth_vqa", "--data", world,
                  "--shots", "0,2,4", "--trials", "2", "--out", tmp_path, "--num-beams", "1")
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("shots"))
    assert "VQA acc % ↑" in lines[header]
    rows = [line.split("|") for line in lines[header + 2 : header + 5]]
    assert [r[0].strip() for r in rows] == ["0", "2", "4"]
    assert all("±" in r[1] for r in rows)
    results = json.loads((tmp_path / "synth_vqa.json").read_text())
    assert [r["shots"] for r in results["results"]] == [0, 2, 4]
    trial = results["results"][2]["trials"][1]
    assert trial["seed"] == 1 and len(trial["predictions"]) == 12
    pred = trial["predictions"][0]
    assert len(pred["demo_uids"]) == 4 and pred["n_images"] == 5
    assert len(pred["references"]) == 10
    zero = results["results"][0]["trials"][0]["predictions"][0]
    assert zero["n_images"] == 1 and len(zero["demo_uids"]) == 2
    png = (tmp_path / "synth_vqa.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


@pytest.mark.parametrize("task, extra", [
    ("synth_captioning", ["--fixed-demos"]),
    ("synth_label_binding", []),
    ("synth_classification", ["--rices"]),
])
def test_cli_runs_every_synthetic_task(toy, tmp_path, capsys, task, extra):
    world, model = toy
    out = run_cli(capsys, "--model", model, "--task", task, "--data", world, "--shots", "0,2",
                  "--trials", "1", "--limit", "3", "--num-beams", "1", "--max-new-tokens", "4",
                  "--out", tmp_path, *extra)
    results = json.loads((tmp_path / f"{task}.json").read_text())
    for metric in results["metrics"]:
        assert metric["label"] in out
        for r in results["results"]:
            assert 0.0 <= r["mean"][metric["name"]] <= 1000.0
    assert len(results["results"][0]["trials"][0]["predictions"]) == 3
    assert os.path.exists(tmp_path / f"{task}.png")


def test_cli_reads_real_format_options_from_config(toy, tmp_path, capsys):
    """A real-benchmark task (VQAv2 reader) pointed at files through a task config."""
    world, model = toy
    vqa = os.path.join(world, "eval", "vqa")
    config = tmp_path / "vqav2.yaml"
    config.write_text(
        f"train_questions: {vqa}/train_questions.json\n"
        f"train_annotations: {vqa}/train_annotations.json\n"
        f"test_questions: {vqa}/test_questions.json\n"
        f"test_annotations: {vqa}/test_annotations.json\n"
        f"train_image_template: '{{data}}/images/{{image_id:012d}}.png'\n"
        f"test_image_template: '{{data}}/images/{{image_id:012d}}.png'\n"
        "template: '<image>Q: {question} A: {answer}<|endofchunk|>'\n"
    )
    run_cli(capsys, "--model", model, "--task", "vqav2", "--data", vqa, "--task-config", config,
            "--shots", "1", "--trials", "1", "--limit", "2", "--num-beams", "1", "--out", tmp_path)
    pred = json.loads((tmp_path / "vqav2.json").read_text())["results"][0]["trials"][0][
        "predictions"][0]
    assert pred["query"].startswith("<image>Q: ") and pred["query"].endswith(" A:")


def test_unknown_option_and_missing_files_are_clear(toy, tmp_path):
    world, _ = toy
    with pytest.raises(ValueError, match="unknown options"):
        get_task("synth_vqa").load(world, {"questions": "x"})
    with pytest.raises(FileNotFoundError, match="not found"):
        get_task("coco").load(str(tmp_path))
    with pytest.raises(ValueError, match="--data"):
        get_task("coco").load(None)
    assert {"coco", "flickr30k", "vqav2", "okvqa", "vizwiz", "textvqa"} <= set(task_names())


def test_queries_split_over_ranks_without_double_counting(toy):
    world, model = toy
    from eval_fewshot.inference import FewShotModel
    from flamingo_kit import FlamingoModel, FlamingoProcessor

    fsm = FewShotModel(FlamingoModel.from_pretrained(model),
                       FlamingoProcessor.from_pretrained(model))
    task = get_task("synth_vqa", num_beams=1, max_new_tokens=3)
    data = task.load(world)
    config = EvalConfig(shots=[1], trials=1)
    single = Evaluator(task, data, fsm, config, Distributed()).run()[0].trials[0]
    rank1 = Evaluator(task, data, fsm, config, Distributed(1, 2))
    rank1_records = rank1.run_trial(rank1.queries[1::2], 1, seed=0)

    class RankZeroOfTwo(Distributed):
        def gather(self, records):
            assert not {r["uid"] for r in records} & {r["uid"] for r in rank1_records}
            return records + rank1_records

    merged = Evaluator(task, data, fsm, config, RankZeroOfTwo(0, 2)).run()[0].trials[0]
    assert [r["uid"] for r in merged["predictions"]] == [r["uid"] for r in single["predictions"]]
    assert merged["predictions"] == single["predictions"]
    assert merged["scores"] == single["scores"]
