"""Atomic writes: a reader finds the previous content or the new content, never a torn file.

Every file the trainer writes goes through here (or, for checkpoints, the same temp-dir +
rename scheme in ``train.checkpoint``). The new content is written beside its target under a
hidden temporary name, flushed to stable storage (``fsync``), then renamed over the target;
a rename within one directory is atomic on POSIX file systems. A process killed mid-write
leaves only the temporary, which the next write to the same target removes.

Replacing a whole directory takes two renames (old away, new in), since POSIX cannot swap a
non-empty directory atomically: a kill between them leaves no target at all, never a partial
one, and the trainer re-creates a missing target on its next run (the tokenizer is retrained,
the export is redone from the last checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (the names of renamed or new files) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """Flush every file under ``root`` and the directories themselves to stable storage."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def _temporary_sibling(path: str, suffix: str) -> str:
    """``DIR/.NAME.SUFFIX`` beside ``path``: same file system, so the final rename is atomic."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{suffix}")


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, replacing any previous file."""
    tmp = _temporary_sibling(path, "tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def replace_directory(src: str, dst: str) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing ``dst`` if it exists.

    ``src`` must already be flushed (:func:`fsync_tree`) and lie in ``dst``'s parent.
    """
    old = _temporary_sibling(dst, "old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dst):
        os.rename(dst, old)
    os.rename(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield an empty temporary directory; on normal exit it replaces ``path`` as a whole.

    If the block raises, ``path`` is left as it was and the temporary is removed. Leftovers of
    a process killed inside the block are removed by the next call for the same ``path``.
    """
    tmp = _temporary_sibling(path, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)
