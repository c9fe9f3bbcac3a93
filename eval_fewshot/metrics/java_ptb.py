"""Running the Java PTB tokenizer that ships with pycocoevalcap, as pycocoevalcap runs it.

pycocoevalcap's ``PTBTokenizer.tokenize`` writes the captions one per line to a file and runs
``java -cp stanford-corenlp-3.4.1.jar edu.stanford.nlp.process.PTBTokenizer -preserveLines
-lowerCase FILE``; :func:`java_ptb_tokenize` does the same with the jar from the installed
pycocoevalcap (the file goes to the system temporary directory, not into site-packages).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

from eval_fewshot.metrics.ptb_tokenizer import LINE_BREAKS

JAR = "stanford-corenlp-3.4.1.jar"


def jar_path() -> str | None:
    """Path of pycocoevalcap's CoreNLP jar, or None when pycocoevalcap is not installed."""
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)), JAR)
    return path if os.path.isfile(path) else None


def java_available() -> bool:
    """Whether :func:`java_ptb_tokenize` can run here (``java`` on PATH and the jar found)."""
    return shutil.which("java") is not None and jar_path() is not None


def java_ptb_tokenize(lines: Sequence[str]) -> list[list[str]]:
    """PTB tokens of each caption from the Java tool (lower-cased, before punctuation removal).

    Line breaks inside a caption become spaces first (pycocoevalcap replaces only ``\\n``; a
    ``\\r`` there would shift every later caption by a line).
    """
    jar, java = jar_path(), shutil.which("java")
    if jar is None or java is None:
        raise RuntimeError("the Java PTB tokenizer needs `java` on PATH and pycocoevalcap "
                           "installed (pip install pycocoevalcap)")
    if not lines:
        return []
    text = "\n".join(line.translate(LINE_BREAKS) for line in lines)
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as handle:
        handle.write(text.encode("utf-8"))
    try:
        result = subprocess.run(
            [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
             "-lowerCase", handle.name], capture_output=True, check=False)
    finally:
        os.remove(handle.name)
    if result.returncode != 0:
        raise RuntimeError(f"the Java PTB tokenizer failed (exit {result.returncode}): "
                           f"{result.stderr.decode(errors='replace').strip()[-500:]}")
    out = result.stdout.decode("utf-8").split("\n")[: len(lines)]
    if len(out) != len(lines):
        raise RuntimeError(f"the Java PTB tokenizer returned {len(out)} lines for "
                           f"{len(lines)} captions")
    return [line.rstrip().split(" ") if line.strip() else [] for line in out]
