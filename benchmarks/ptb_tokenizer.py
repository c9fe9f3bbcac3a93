"""Agreement of the Python caption tokenizer with pycocoevalcap's Java PTB tokenizer, and speed.

    python -m benchmarks.ptb_tokenizer [--captions 3000] [--hard 1500] [--characters] [--seed 0]

Sets (from ``tests/caption_samples.py``): COCO-style template captions covering what PTB
treats specially, and hard strings glued from fragments captions do not contain. For each set:
how many strings get the same tokens after pycocoevalcap's punctuation removal (what CIDEr-D
and BLEU see), and before it apart from the extra ``.`` Java adds after a sentence-final
abbreviation. ``--characters`` also tokenises every Basic Multilingual Plane character alone
("x C y") and inside a word ("xCy"). Needs ``java`` and pycocoevalcap.
"""

from __future__ import annotations

import argparse
import time

from eval_fewshot.metrics.java_ptb import java_available, java_ptb_tokenize
from eval_fewshot.metrics.ptb_tokenizer import ptb_tokenize_lines
from eval_fewshot.metrics.text import PTB_PUNCTUATION
from tests.caption_samples import coco_style_captions, hard_strings


def agreement(strings: list[str]) -> dict[str, float]:
    """Counts of equal token lists (after punctuation removal; raw without "." tokens) and
    the Python tokenizer's speed on ``strings``."""
    start = time.perf_counter()
    ours = ptb_tokenize_lines(strings)
    seconds = time.perf_counter() - start
    java = java_ptb_tokenize(strings)

    def kept(tokens: list[str], drop: frozenset | set) -> list[str]:
        return [t for t in tokens if t not in drop]

    return {
        "strings": len(strings),
        "scored": sum(kept(a, PTB_PUNCTUATION) == kept(b, PTB_PUNCTUATION)
                      for a, b in zip(ours, java)),
        "raw": sum(kept(a, {"."}) == kept(b, {"."}) for a, b in zip(ours, java)),
        "per_second": len(strings) / seconds,
    }


def character_lines() -> tuple[list[str], list[str]]:
    """Each BMP character (no surrogates or line breaks) alone and inside a word; groups."""
    lines, groups = [], []
    for code in range(0x20, 0x10000):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF or char in "\x85\u2028\u2029":
            continue
        group = "U+0020-U+024F" if code < 0x250 else "U+0250-U+FFFF"
        lines += [f"x {char} y", f"x{char}y"]
        groups += [group, group]
    return lines, groups


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=3000)
    parser.add_argument("--hard", type=int, default=1500)
    parser.add_argument("--characters", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not java_available():
        raise SystemExit("needs `java` on PATH and pycocoevalcap installed")
    results = {
        "COCO-style captions": agreement(coco_style_captions(args.captions, args.seed)),
        "hard strings": agreement(hard_strings(args.hard, args.seed)),
    }
    if args.characters:
        lines, groups = character_lines()
        for group in sorted(set(groups)):
            results[f"characters {group}"] = agreement(
                [line for line, g in zip(lines, groups) if g == group])
    print("| set | strings | same scored tokens | same raw tokens (no '.') | Python strings/s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['strings']} | {r['scored']} ({100 * r['scored'] / r['strings']:.2f}%)"
              f" | {r['raw']} ({100 * r['raw'] / r['strings']:.2f}%) | {r['per_second']:.0f} |")
    return results


if __name__ == "__main__":
    main()
