"""Metrics: hand-worked VQA cases from the official rules; CIDEr-D/BLEU against the COCO toolkit."""

import random
import shutil

import pytest

from eval_fewshot.metrics import (
    chair,
    cider_d,
    corpus_bleu,
    exact_match,
    mean_vqa_accuracy,
    normalize_answer,
    tokenize_caption,
    tokenize_captions,
    top1_accuracy,
    vqa_accuracy,
)
from eval_fewshot.metrics.java_ptb import java_available, java_ptb_tokenize
from eval_fewshot.metrics.ptb_tokenizer import ptb_tokenize_lines
from eval_fewshot.metrics.vqa import CONTRACTIONS
from eval_fewshot.tasks import caption_metric
from tests.caption_samples import coco_style_captions, hard_strings


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


# pycocoevalcap's tokenisation (Java PTBTokenizer of CoreNLP 3.4.1, -preserveLines -lowerCase,
# then its punctuation removal), recorded from `PTBTokenizer().tokenize(...)` so that this check
# runs without Java; test_python_tokenizer_equals_java_on_coco_style_captions compares on
# thousands of captions when Java is there.
PTB_CASES = [
    ("A dog at 7 a.m. in the U.S. with Mr. Smith on St. James street.",
     "a dog at 7 a.m. in the u.s. with mr. smith on st. james street"),
    ("A bus stops at 5 p.m. near Dr. Lee's office, etc.",
     "a bus stops at 5 p.m. near dr. lee 's office etc."),
    ("A (small) dog [big] {x} cat.",
     "a -lrb- small -rrb- dog -lsb- big -rsb- -lcb- x -rcb- cat"),
    ("I cannot go, I'm gonna stay. Wanna? Gotta!",
     "i can not go i 'm gon na stay wan na got ta"),
    ("'Tis a clock that says 12:30 and 3:45pm.",
     "'t is a clock that says 12:30 and 3:45 pm"),
    ("A dog/cat sitting on a red/blue/green/white rug.",
     "a dog/cat sitting on a red/blue/green / white rug"),
    ("yes!! really?!", "yes !! really ?!"),
    ("A dog's ball, on the grass. Don't stop!", "a dog 's ball on the grass do n't stop"),
    ("It costs $3.50 or 1,000 -- well-known...", "it costs $ 3.50 or 1,000 well-known"),
    ('"Hello," she said \u2014 a 5% discount & more #1 @home',
     "hello she said a 5 % discount & more # 1 @home"),
    ("A 1/2 pizza and 3 1/2 cakes, \u00bd eaten.", "a 1/2 pizza and 3\xa01/2 cakes 1/2 eaten"),
    ("They're rock'n'roll fans from the '90s at 10 o'clock.",
     "they 're rock 'n' roll fans from the '90s at 10 o'clock"),
    ("The U.S. The end", "the u.s. the end"),
    ("A T-shirt, an x-ray and an anti-war sign (c. 1970).",
     "a t-shirt an x-ray and an anti-war sign -lrb- c. 1970 -rrb-"),
    # Recorded the same way, one caption per call, for every class of issue 13 item 9.
    ('Two buses at 10 A.M. and one at 3 P.M. on Fifth Ave.',
     'two buses at 10 a.m. and one at 3 p.m. on fifth ave.'),
    ('A sign for Main St.',
     'a sign for main st.'),
    ('Cats, dogs, etc.',
     'cats dogs etc.'),
    ('A flag of the U.S.',
     'a flag of the u.s.'),
    ('A dog vs. a cat at No. 5 and no. more',
     'a dog vs. a cat at no. 5 and no more'),
    ('A man who CANNOT swim, Gonna wanna GOTTA lemme gimme.',
     'a man who can not swim gon na wan na got ta lem me gim me'),
    ('A clock showing 12:30, 3:45 and 10:00 pm.',
     'a clock showing 12:30 3:45 and 10:00 pm'),
    ('A 2.5 inch screw, 10,000 people, -5 degrees and 24/7 service.',
     'a 2.5 inch screw 10,000 people -5 degrees and 24/7 service'),
    ('A black/white and/or red/blue/green/white on/off sign.',
     'a black/white and/or red/blue/green / white on/off sign'),
    ('Wow!! What?! Really?? Yes!!!',
     'wow !! what ?! really ?? yes !!!'),
    ("The dogs' owner isn't here, it's the children's toy and we'll see, I'd say they've won't",
     "the dogs owner is n't here it 's the children 's toy and we 'll see i 'd say they 've wo n't"),
    ("A dog\u2019s toy, don\u2019t touch \u2018it\u2019 O'Neil's o'clock y'all ma'am",
     "a dog 's toy do n't touch it o'neil 's o'clock y' all ma'am"),
    ('A sign that says "STOP" and \'open\' next to "Hello," she said.',
     'a sign that says stop and open next to hello she said'),
    ('A two-story half-eaten black-and-white e-mail --- x -- y - z',
     'a two-story half-eaten black-and-white e-mail x y z'),
    ('A man\u2014smiling\u2013waves . . . and\u2026 waits... then.... no..',
     'a man smiling waves and waits then no'),
    ('A dog., a cat; a bird: a fish.; 5.,',
     'a dog. a cat a bird a fish. 5.'),
    ('A sign with the letter A.',
     'a sign with the letter a.'),
    ('A man with a letter B. The end.',
     'a man with a letter b the end'),
    ('(left) [sic] {x} ( big ) (1)',
     '-lrb- left -rrb- -lsb- sic -rsb- -lcb- x -rcb- -lrb- big -rrb- -lrb- 1 -rrb-'),
    ("100% 1/2 2x4 5th '90s 1990s #1 & * + = < > @",
     "100 % 1/2 2x4 5th '90s 1990s # 1 & * + = < > @"),
]


@pytest.mark.parametrize("caption, expected", PTB_CASES)
def test_tokenize_caption_matches_recorded_ptb_outputs(caption, expected):
    assert tokenize_caption(caption) == expected
    assert tokenize_captions([caption]) == [expected]


def test_tokenize_captions_reads_the_next_caption_like_pycocoevalcap():
    """A single letter's period ends the sentence when the next line opens one (recorded)."""
    assert tokenize_captions(["A sign with the letter A.", "A dog."]) == [
        "a sign with the letter a", "a dog"]
    assert tokenize_captions(["A sign with the letter A.", "a dog."]) == [
        "a sign with the letter a.", "a dog"]
    assert tokenize_caption("A sign with the letter A.") == "a sign with the letter a."


needs_java = pytest.mark.skipif(
    not java_available(), reason="java (or pycocoevalcap's jar) is not installed: the Java PTB "
    "tokenizer cannot run; test_tokenize_caption_matches_recorded_ptb_outputs covers recorded "
    "outputs")


def without_periods(lines: list[list[str]]) -> list[list[str]]:
    return [[t for t in tokens if t != "."] for tokens in lines]


@needs_java
def test_python_tokenizer_equals_java_on_coco_style_captions():
    """Our tokenizer against pycocoevalcap's own tokenisation on 3,000 captions dense in the
    classes PTB treats specially: every caption equal, before punctuation removal too (apart
    from the extra "." the Java tool adds after a sentence-final abbreviation)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = coco_style_captions(3000, seed=0) + [c for c, _ in PTB_CASES]
    reference = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    ours = tokenize_captions(captions)
    assert [i for i, c in enumerate(ours) if c != reference[i][0]] == []
    assert tokenize_captions(captions, "java") == ours
    raw_java, raw_ours = java_ptb_tokenize(captions), ptb_tokenize_lines(captions)
    assert [i for i, (a, b) in enumerate(zip(without_periods(raw_java), without_periods(raw_ours)))
            if a != b] == []


# Share of hard_strings(1500, seed=0) tokenised as Java does: 1,481 of 1,500 (0.9873) when
# this was written; see the README.
AGREEMENT_FLOOR = 0.98


@needs_java
def test_python_tokenizer_agreement_on_hard_strings():
    """Strings glued from fragments captions do not contain (URLs, e-mail, HTML, emoticons,
    words without spaces between them): the share tokenised as Java does, a floor so that a
    change that loses agreement is seen."""
    strings = hard_strings(1500, seed=0)
    java, ours = tokenize_captions(strings, "java"), tokenize_captions(strings)
    agree = sum(a == b for a, b in zip(java, ours)) / len(strings)
    assert agree >= AGREEMENT_FLOOR, f"{agree:.4f} of hard strings agree"


def test_cider_end_to_end_equals_pycocoevalcap_on_captions_with_ptb_cases():
    """Tokenisation and CIDEr-D together, as COCOEvalCap computes them."""
    pytest.importorskip("pycocoevalcap")
    rng = random.Random(1)
    captions = coco_style_captions(60, seed=2)
    records = [{"prediction": captions[i],
                "references": [rng.choice(captions) for _ in range(4)] + [captions[i + 1]]}
               for i in range(0, 50)]
    ours = caption_metric("cider").compute(records)
    if not java_available():
        pytest.skip("java is not installed; the reference tokenisation cannot run")
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in r["references"]]
                              for i, r in enumerate(records)})
    res = tokenizer.tokenize({i: [{"caption": r["prediction"]}] for i, r in enumerate(records)})
    theirs, _ = Cider().compute_score(gts, res)
    assert ours == pytest.approx(100 * theirs, abs=1e-9)
    assert caption_metric("cider", "java").compute(records) == pytest.approx(ours, abs=1e-12)


def test_caption_metrics_say_which_tokenizer_ran():
    assert caption_metric("cider").variant == "ptb-python"
    assert caption_metric("bleu4", "python").variant == "ptb-python"
    with pytest.raises(ValueError, match="caption tokenizer"):
        caption_metric("cider", "nltk")


def test_java_tokenizer_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="needs `java` on PATH"):
        tokenize_captions(["a dog"], "java")


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
