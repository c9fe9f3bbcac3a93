"""Metrics: hand-worked VQA cases from the official rules; CIDEr-D/BLEU against the COCO toolkit."""

import random

import pytest

from eval_fewshot.metrics import (
    chair,
    cider_d,
    corpus_bleu,
    exact_match,
    mean_vqa_accuracy,
    normalize_answer,
    tokenize_caption,
    top1_accuracy,
    vqa_accuracy,
)
from eval_fewshot.metrics.vqa import CONTRACTIONS


def ten(n_match: int, answer: str = "2", other: str = "3") -> list[str]:
    return [answer] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize("n_match, expected", [(4, 1.0), (3, 0.9), (2, 0.6), (1, 0.3), (0, 0.0)])
def test_vqa_leave_one_out_averaging(n_match, expected):
    assert vqa_accuracy("Two", ten(n_match)) == pytest.approx(expected, abs=1e-12)


def test_vqa_leave_one_out_with_all_ten_matching():
    assert vqa_accuracy("2", ["2"] * 10) == 1.0


@pytest.mark.parametrize(
    "prediction, answer",
    [("a dog", "dog"), ("dont", "don't"), ("The Dog.", "dog"), ("two", "2"),
     ("yes!", "yes"), ("1,000", "1000"), ("3.5", "3.5"), ("red/blue", "red blue")],
)
def test_vqa_official_normalisation_matches(prediction, answer):
    assert vqa_accuracy(prediction, [answer] * 5 + ["something else"] * 5) == 1.0


@pytest.mark.parametrize("prediction, answer", [("3.5", "35"), ("cats", "cat"), ("no", "yes")])
def test_vqa_normalisation_keeps_different_answers_apart(prediction, answer):
    assert vqa_accuracy(prediction, [answer] * 10) == 0.0


def test_vqa_official_script_skips_normalisation_when_humans_agree():
    assert vqa_accuracy("Yes", ["yes"] * 10, mode="normalize_all") == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10, mode="official") == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"], mode="official") == 1.0


@pytest.mark.parametrize("prediction, answer", [("Yes.", "yes"), ("2.", "2"), ("the dog", "dog")])
def test_vqa_default_is_the_official_script(prediction, answer):
    """GT-Vision-Lab vqaEval.py processes answers only when the ten humans disagree."""
    assert vqa_accuracy(prediction, [answer] * 10) == 0.0
    assert mean_vqa_accuracy([prediction], [[answer] * 10]) == 0.0
    assert vqa_accuracy(prediction, [answer] * 10, mode="normalize_all") == 1.0
    assert mean_vqa_accuracy([prediction], [[answer] * 10], mode="normalize_all") == 1.0
    assert vqa_accuracy(prediction, [answer] * 9 + ["cat"]) == 1.0  # humans disagree


# Scores of the official script (GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/
# vqaEval.py at a013f00, run under Python 3 on these inputs); ten answers each.
OFFICIAL_CASES = [
    ("Yes.", ["yes"] * 10, 0.0),
    ("yes", ["yes"] * 10, 1.0),
    ("Yes.", ["yes"] * 8 + ["no"] * 2, 1.0),
    ("2.", ["2"] * 10, 0.0),
    ("two", ["2"] * 7 + ["3"] * 3, 1.0),
    ("the dog", ["dog"] * 10, 0.0),
    ("the dog", ["dog"] * 2 + ["cat"] * 8, 0.6),
    ("dont", ["don't"] * 4 + ["no"] * 6, 1.0),
    ("'ow'sat", ["'ow's'at"] * 3 + ["x"] * 7, 0.9),
    ("red/blue", ["red blue", "red"] * 5, 1.0),
    ("1,000", ["1000"] * 3 + ["100"] * 7, 0.9),
    ("3.5", ["35"] * 10, 0.0),
    ("Red ", ["red"] * 1 + ["Red"] * 9, 1.0),
]


@pytest.mark.parametrize("prediction, answers, expected", OFFICIAL_CASES)
def test_vqa_matches_official_script_outputs(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_contraction_table_matches_official():
    assert normalize_answer("'ow'sat") == "'ow's'at"
    assert CONTRACTIONS["'ow'sat"] == "'ow's'at"


def test_vqa_rejects_unknown_mode():
    with pytest.raises(ValueError, match="official"):
        vqa_accuracy("a", ["a"], mode="lenient")


def test_normalize_answer_rules():
    assert normalize_answer("  The two Dogs!\n") == "2 dogs"
    assert normalize_answer("isnt it") == "isn't it"


def synthetic_captions(n_images: int, seed: int):
    """Reference captions (5 per image) and candidates with varying overlap, tokenised."""
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow", "purple"]
    shapes = ["circle", "square", "triangle", "star"]
    verbs = ["sits", "is", "lies", "appears"]
    places = ["on the left", "on the right", "in the middle", "near the top", "at the bottom"]

    def caption():
        return (f"a {rng.choice(['small', 'large', 'big'])} {rng.choice(colors)} "
                f"{rng.choice(shapes)} {rng.choice(verbs)} {rng.choice(places)}.")

    refs = [[tokenize_caption(caption()) for _ in range(5)] for _ in range(n_images)]
    cands = []
    for i in range(n_images):
        kind = i % 4
        if kind == 0:
            cands.append(refs[i][0])
        elif kind == 1:
            cands.append(tokenize_caption(caption()))
        elif kind == 2:
            cands.append(" ".join(refs[i][1].split()[:3]))
        else:
            cands.append(tokenize_caption("There is a " + caption() + " and a picture."))
    return cands, refs


def test_cider_d_equals_coco_reference_implementation():
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    cands, refs = synthetic_captions(24, seed=3)
    ours, ours_per_image = cider_d(cands, refs)
    gts = {i: refs[i] for i in range(len(refs))}
    res = {i: [cands[i]] for i in range(len(cands))}
    theirs, theirs_per_image = Cider().compute_score(gts, res)
    assert ours == pytest.approx(float(theirs), abs=1e-6)
    assert ours_per_image == pytest.approx(list(theirs_per_image), abs=1e-6)
    assert 0.1 < ours < 10  # a non-degenerate set: some overlap, not all perfect


def test_cider_d_hand_computed_case():
    # Two images, candidate == single reference: each uni/bigram has df 1, weight ln 2, cosine 1
    # for n=1,2 and 0 for n=3,4 (no trigrams), penalty 1 -> 10 * mean(1, 1, 0, 0) = 5.
    score, per_image = cider_d(["a b", "c d"], [["a b"], ["c d"]])
    assert per_image == pytest.approx([5.0, 5.0])
    assert score == pytest.approx(5.0)


def test_cider_d_rejects_mismatched_ids():
    with pytest.raises(ValueError, match="same image ids"):
        cider_d({1: "a"}, {2: ["a"]})


def test_bleu_equals_coco_reference_implementation():
    Bleu = pytest.importorskip("pycocoevalcap.bleu.bleu").Bleu
    cands, refs = synthetic_captions(24, seed=5)
    theirs, _ = Bleu(4).compute_score(
        {i: refs[i] for i in range(24)}, {i: [cands[i]] for i in range(24)}, verbose=0
    )
    assert corpus_bleu(cands, refs) == pytest.approx(theirs, abs=1e-9)


def test_bleu_perfect_and_disjoint():
    assert corpus_bleu(["a b c d e"], [["a b c d e"]])[3] == pytest.approx(1.0)
    assert corpus_bleu(["x y z w"], [["a b c d"]])[3] < 1e-6


def test_tokenize_caption_matches_ptb_conventions():
    assert tokenize_caption("A dog's ball, on the grass. Don't stop!") == (
        "a dog 's ball on the grass do n't stop"
    )
    assert tokenize_caption("It costs 3.5 or 1,000 -- well-known...") == (
        "it costs 3.5 or 1,000 well-known"
    )


def test_chair_counts_hallucinated_objects():
    objects = [[{"shape": "circle", "color": "red"}], [{"shape": "square", "color": "blue"}]]
    captions = ["A red circle and a blue star.", "Two blue squares."]
    assert chair(captions, objects) == {"chair_i": 0.0, "chair_s": 0.0}  # "star" is unknown
    rates = chair(captions, objects, shapes=["star"])
    assert rates == {"chair_i": pytest.approx(1 / 3), "chair_s": pytest.approx(0.5)}
    red_circle = [[{"shape": "circle", "color": "red"}]]
    wrong_color = chair(["a green circle"], red_circle, colors=["green"])
    assert wrong_color["chair_i"] == 1.0


def test_exact_match_and_top1():
    assert exact_match(["Blick.", "dax"], ["blick", "wug"]) == 0.5
    assert top1_accuracy(["cat", "dog", "cat"], ["cat", "cat", "cat"]) == pytest.approx(2 / 3)
