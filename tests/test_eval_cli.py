"""End to end: `flamingo-eval` on a tiny untrained model and toy datasets in the real formats."""

import json
import os
import shutil

import pytest

from eval_fewshot import cli
from eval_fewshot.runner import EvalConfig, Evaluator
from eval_fewshot.tasks import get_task, task_names
from eval_fewshot.toy import build_toy_model, write_toy_eval_sets
from flamingo_kit.distributed import DistInfo
from tests.official_formats import (
    write_coco_karpathy,
    write_okvqa,
    write_textvqa,
    write_vizwiz,
    write_vqav2,
)


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
    assert [r[1].strip() for r in rows] == ["0.0", "2.0", "4.0"]  # shots used
    assert all("±" in r[2] for r in rows)
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
    single = Evaluator(task, data, fsm, config, DistInfo()).run()[0].trials[0]
    rank1 = Evaluator(task, data, fsm, config, DistInfo(rank=1, world_size=2))
    rank1_records = rank1.run_trial(rank1.queries[1::2], 1, seed=0)

    class RankZeroOfTwo(DistInfo):
        def gather(self, records):
            assert not {r["uid"] for r in records} & {r["uid"] for r in rank1_records}
            return records + rank1_records

    merged = Evaluator(task, data, fsm, config, RankZeroOfTwo(rank=0, world_size=2)).run()[0].trials[0]
    assert [r["uid"] for r in merged["predictions"]] == [r["uid"] for r in single["predictions"]]
    assert merged["predictions"] == single["predictions"]
    assert merged["scores"] == single["scores"]


# -- input checks, launcher arguments, reported settings ----------------------------------------


def run_cli_error(capsys, *args, after_run: bool = False) -> str:
    """Run the CLI expecting a clean failure: non-zero exit and a one-line message (the only
    stderr line, or the last one after progress bars when the run itself failed)."""
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert info.value.code not in (0, None) and "Traceback" not in err, err
    lines = err.splitlines()
    assert (after_run or len(lines) == 1) and lines[-1].startswith("flamingo-eval: error: "), err
    return lines[-1]


@pytest.mark.parametrize("flag, value", [
    ("--limit", "-3"), ("--limit", "0"), ("--num-beams", "0"), ("--trials", "0"),
    ("--batch-size", "0"), ("--max-new-tokens", "0"), ("--max-context", "-5"),
])
def test_bad_numbers_are_one_line_errors(toy, tmp_path, capsys, flag, value):
    world, model = toy
    err = run_cli_error(capsys, "--model", model, "--task", "synth_vqa", "--data", world,
                        "--shots", "1", "--trials", "1", "--num-beams", "1", "--out", tmp_path,
                        flag, value)
    assert flag in err and value in err


def test_malformed_annotation_file_is_a_one_line_error(toy, tmp_path, capsys):
    _, model = toy
    write_okvqa(str(tmp_path / "okvqa"))
    bad = tmp_path / "okvqa" / "mscoco_val2014_annotations.json"
    bad.write_text('{"annotations": [{"question_id": 1}')
    err = run_cli_error(capsys, "--model", model, "--task", "okvqa", "--data",
                        tmp_path / "okvqa", "--shots", "1", "--out", tmp_path)
    assert str(bad) in err and "not valid JSON" in err


def test_unknown_option_is_a_one_line_error(toy, tmp_path, capsys):
    world, model = toy
    err = run_cli_error(capsys, "--model", model, "--task", "synth_vqa", "--data", world,
                        "--option", "questions=x.json", "--out", tmp_path)
    assert "unknown options" in err and "questions" in err


def test_deepspeed_launcher_local_rank_is_accepted(toy, tmp_path, capsys):
    """``deepspeed --module eval_fewshot`` appends ``--local_rank=N``."""
    world, model = toy
    run_cli(capsys, "--model", model, "--task", "synth_vqa", "--data", world, "--shots", "1",
            "--trials", "1", "--limit", "2", "--num-beams", "1", "--max-new-tokens", "2",
            "--out", tmp_path, "--local_rank=0")
    assert cli.build_parser().parse_args(
        ["--model", "m", "--task", "coco", "--local-rank", "1"]).local_rank == 1


def test_shots_used_are_recorded_printed_and_checked(toy, tmp_path, capsys):
    world, model = toy
    args = ["--model", model, "--task", "synth_vqa", "--data", world, "--trials", "2",
            "--limit", "4", "--num-beams", "1", "--max-new-tokens", "2",
            "--max-context", "160", "--out", tmp_path]  # a demo is ~45 toy tokens
    assert cli.main([str(a) for a in args + ["--shots", "1,4"]]) == 0
    out, err = capsys.readouterr()
    results = json.loads((tmp_path / "synth_vqa.json").read_text())
    one, four = results["results"]
    used = [p["shots_used"] for t in four["trials"] for p in t["predictions"]]
    assert [p["shots_used"] for t in one["trials"] for p in t["predictions"]] == [1] * 8
    assert all(p["shots_used"] == len(p["demo_uids"]) for t in four["trials"]
               for p in t["predictions"])
    assert 0 < min(used) and max(used) < 4
    assert four["shots_used"] == {"mean": sum(used) / len(used), "min": min(used),
                                  "max": max(used)}
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("shots"))
    assert "used" in lines[header]
    assert lines[header + 3].split("|")[1].strip() == f"{sum(used) / len(used):.1f}"
    assert "4-shot" in err and "fewer" in err
    # --strict-shots refuses to report such a row.
    err = run_cli_error(capsys, *args, "--shots", "4", "--trials", "1", "--strict-shots",
                        after_run=True)
    assert "4-shot" in err and "--max-context" in err


def test_no_demonstration_fits(toy, tmp_path, capsys):
    world, model = toy
    out = run_cli(capsys, "--model", model, "--task", "synth_vqa", "--data", world,
                  "--shots", "4", "--trials", "1", "--limit", "2", "--num-beams", "1",
                  "--max-new-tokens", "1", "--max-context", "5", "--out", tmp_path)
    results = json.loads((tmp_path / "synth_vqa.json").read_text())
    assert results["results"][0]["shots_used"] == {"mean": 0, "min": 0, "max": 0}
    row = next(line for line in out.splitlines() if line.strip().startswith("4 "))
    assert row.split("|")[1].strip() == "0.0"


@pytest.mark.parametrize("extra, mode", [([], "official"),
                                         (["--vqa-mode", "normalize_all"], "normalize_all")])
def test_vqa_mode_is_printed_and_saved(toy, tmp_path, capsys, extra, mode):
    world, model = toy
    out = run_cli(capsys, "--model", model, "--task", "synth_vqa", "--data", world,
                  "--shots", "0", "--trials", "1", "--limit", "2", "--num-beams", "1",
                  "--max-new-tokens", "2", "--out", tmp_path, *extra)
    results = json.loads((tmp_path / "synth_vqa.json").read_text())
    assert results["metrics"][0]["variant"] == mode
    assert f"VQA acc %: {mode}" in out


def test_vqa_mode_scores_differ_as_documented():
    from eval_fewshot.tasks import vqa_metric
    records = [{"prediction": "Red.", "references": ["red"] * 10}]
    assert vqa_metric().compute(records) == 0.0
    assert vqa_metric("normalize_all").compute(records) == 100.0
    with pytest.raises(ValueError, match="vqa_mode applies to tasks reporting vqa_accuracy"):
        get_task("coco", vqa_mode="official")


@pytest.mark.slow
def test_deepspeed_launcher_two_processes(toy, tmp_path):
    """The real ``deepspeed --module eval_fewshot`` launch (two CPU ranks) equals one process."""
    import subprocess
    import sys

    from train.distributed import free_port

    world, model = toy
    common = ["--model", model, "--task", "synth_vqa", "--data", world, "--shots", "0,2",
              "--trials", "1", "--num-beams", "1", "--max-new-tokens", "2"]
    launcher = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
                "--master_port", str(free_port()), "--module", "eval_fewshot"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    result = subprocess.run(launcher + common + ["--out", str(tmp_path / "ds")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert cli.main(common + ["--out", str(tmp_path / "one")]) == 0

    def predictions(name):
        results = json.loads((tmp_path / name / "synth_vqa.json").read_text())["results"]
        return [[p["raw_prediction"] for t in r["trials"] for p in t["predictions"]]
                for r in results]

    assert predictions("ds") == predictions("one")


# -- official release formats, end to end ---------------------------------------------------------


@pytest.mark.parametrize("task, writer", [
    ("okvqa", write_okvqa), ("vqav2", write_vqav2), ("vizwiz", write_vizwiz),
    ("textvqa", write_textvqa), ("coco", write_coco_karpathy),
])
def test_official_release_files_run_end_to_end(toy, tmp_path, capsys, task, writer):
    """``--data`` pointed at a directory laid out as the official download, nothing renamed."""
    _, model = toy
    expected = writer(str(tmp_path / "data"))
    extra = []
    if task == "coco" and shutil.which("java"):
        extra = ["--caption-tokenizer", "java"]  # the reference tokenizer, where it can run
    out = run_cli(capsys, "--model", model, "--task", task, "--data", tmp_path / "data",
                  "--shots", "2", "--trials", "1", "--num-beams", "1", "--max-new-tokens", "3",
                  "--out", tmp_path / "out", *extra)
    results = json.loads((tmp_path / "out" / f"{task}.json").read_text())
    predictions = results["results"][0]["trials"][0]["predictions"]
    assert len(predictions) == 3
    for p in predictions:
        assert p["references"] == expected[p["uid"]] and p["shots_used"] == 2
    if task == "coco":
        variant = "ptb-java" if extra else "ptb-python"
        assert [m["variant"] for m in results["metrics"]] == [variant, variant]
        assert f"CIDEr-D: {variant}" in out


def test_java_tokenizer_without_java_is_a_one_line_error(toy, tmp_path, capsys, monkeypatch):
    _, model = toy
    write_coco_karpathy(str(tmp_path / "data"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    err = run_cli_error(capsys, "--model", model, "--task", "coco", "--data", tmp_path / "data",
                        "--caption-tokenizer", "java", "--out", tmp_path)
    assert "java" in err


def test_generation_config_file_is_applied_and_recorded(toy, tmp_path, capsys):
    world, model = toy
    gen = tmp_path / "gen.json"
    gen.write_text(json.dumps({"repetition_penalty": 0.2, "no_repeat_ngram_size": 2,
                               "max_new_tokens": 6, "num_beams": 2}))
    args = ["--model", model, "--task", "synth_captioning", "--data", world, "--shots", "2",
            "--trials", "1", "--limit", "4", "--fixed-demos", "--num-beams", "1"]

    def predictions(out, *extra):
        run_cli(capsys, *args, "--out", tmp_path / out, *extra)
        results = json.loads((tmp_path / out / "synth_captioning.json").read_text())
        return results["generation"], [p["raw_prediction"] for t in results["results"][0]["trials"]
                                       for p in t["predictions"]]

    settings, reused = predictions("reuse", "--generation-config", gen)
    # --num-beams overrides the file; the file's max_new_tokens overrides the task's 20.
    assert settings == {"repetition_penalty": 0.2, "no_repeat_ngram_size": 2,
                        "max_new_tokens": 6, "num_beams": 1}
    _, whole = predictions("whole", "--generation-config", gen, "--no-prefix-reuse")
    assert reused == whole  # the processors see the shared demonstrations after a prefix too
    plain_settings, plain = predictions("plain")
    assert plain_settings == {"max_new_tokens": 20, "num_beams": 1} and plain != reused


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "is not a JSON file"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"repetition_penalty": 1.2, "max_new_token": 5}', "unknown GenerationConfig fields "
     "['max_new_token']"),
    ('{"guidance_scale": 2.0}', "cannot honour guidance_scale=2.0"),
    ('{"do_sample": true, "num_return_sequences": 2}', "one answer per query; remove "
     "num_return_sequences=2"),
])
def test_bad_generation_config_file_is_a_one_line_error(toy, tmp_path, capsys, content, message):
    world, model = toy
    path = tmp_path / "gen.json"
    if content is not None:
        path.write_text(content)
    err = run_cli_error(capsys, "--model", model, "--task", "synth_vqa", "--data", world,
                        "--generation-config", path, "--out", tmp_path)
    assert f"--generation-config {path}" in err and message in err
