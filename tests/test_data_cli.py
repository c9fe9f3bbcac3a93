"""flamingo-data CLI: synth writes the world, inspect shows the token/label layout."""

import json

from data_pipelines.cli import main


def test_synth_then_inspect(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["synth", "--out", str(out), "--seed", "1", "--n-pairs", "12", "--n-docs", "6",
                 "--n-anchored", "3",
                 "--n-corpus", "20", "--n-eval", "5", "--n-episodes", "1", "--image-size", "32",
                 "--shard-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["image_size"] == 32 and len(summary["pair_shards"]) == 3
    assert main(["inspect", str(out / "interleaved"), "-n", "2"]) == 0
    shown = capsys.readouterr().out
    assert shown.count(" interleaved ") == 2
    assert "LOSS '" in shown and "---- '<image>'" in shown and "skipped: none" in shown
    assert main(["inspect", str(out / "pairs"), "--kind", "pairs", "-n", "1"]) == 0
    assert "pair00000000  pairs  1 images [32x32]" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty"), "-n", "1"]) == 2
    assert "no shards found" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "x"), "--image-size", "4"]) == 2
    assert "image_size must be >= 16" in capsys.readouterr().err
