"""Which shard strings may be opened, and opening them: local files unless a source opts in.

webdataset's opener (``gopen``) dispatches on the string it is given: ``pipe:CMD`` runs CMD in
a shell, ``http(s)://``, ``s3://``, ``gs://``, ... start curl/aws/gsutil processes, and the
``GOPEN_REWRITE`` environment variable can turn a local path into any of those. Shard lists
travel between people and machines, so here:

- a string without a URL scheme is a local path (a ``.tar`` file, a directory of them, a
  brace pattern ``docs-{000000..000009}.tar`` or a glob ``docs-*.tar``) and is opened with
  ``open()``, never through webdataset's opener; ``file:`` URLs are local paths too;
- ``pipe:`` strings are used only by a source with ``allow_pipe=True``;
- ``scheme://...`` strings (http, https, s3, gs, hf, ...) only by a source with
  ``allow_remote=True``; those two go through webdataset's ``gopen``.

Anything else is refused with an error naming the source and the opt-in it would need. The
check is made when a source is configured and again when each shard is opened.
"""

from __future__ import annotations

import glob
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from urllib.parse import urlparse

from braceexpand import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

LOCAL, PIPE, REMOTE = "local", "pipe", "remote"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_GLOB = re.compile(r"[*?\[]")


def shard_kind(spec: str) -> str:
    """``"local"``, ``"pipe"`` or ``"remote"``: how a shard string would be opened."""
    match = _SCHEME.match(spec)
    if match is None or match.group(1).lower() == "file":
        return LOCAL
    return PIPE if match.group(1).lower() == "pipe" else REMOTE


def check_shard(spec: str, source: str, allow_pipe: bool = False,
                allow_remote: bool = False) -> str:
    """Raise ValueError unless ``source`` may open ``spec``; return its kind."""
    kind = shard_kind(spec)
    if kind == PIPE and not allow_pipe:
        raise ValueError(
            f"source {source!r}: shard {spec!r} is a shell command (pipe:); commands run only "
            "for a source that sets allow_pipe: true. Give local paths, or opt in if you "
            "trust this shard list"
        )
    if kind == REMOTE and not allow_remote:
        scheme = _SCHEME.match(spec).group(1)
        raise ValueError(
            f"source {source!r}: shard {spec!r} is a URL ({scheme}:); remote shards are read "
            "only for a source that sets allow_remote: true. For a local path that contains "
            f"':', write it as ./{spec}"
        )
    return kind


def local_path(spec: str) -> str:
    """The file-system path of a local shard string (``file:`` URLs unwrapped)."""
    if not spec.lower().startswith("file:"):
        return spec
    parsed = urlparse(spec)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"shard {spec!r} names another host; only local file: URLs are read")
    return parsed.path


def expand_shards(spec: str | Sequence[str], source: str = "shards", allow_pipe: bool = False,
                  allow_remote: bool = False) -> list[str]:
    """Shard strings from a directory, a brace pattern, a glob, or a list of any of these.

    A directory means every ``*.tar`` inside it, sorted by name; a glob matches sorted. Every
    resulting string is checked with :func:`check_shard`.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    shards: list[str] = []
    for item in specs:
        for expanded in braceexpand(os.fspath(item)):
            if check_shard(expanded, source, allow_pipe, allow_remote) != LOCAL:
                shards.append(expanded)
                continue
            path = local_path(expanded)
            if os.path.isdir(path):
                shards.extend(sorted(glob.glob(os.path.join(glob.escape(path), "*.tar"))))
            elif _GLOB.search(path):
                shards.extend(sorted(glob.glob(path)))
            else:
                shards.append(expanded)
    return shards


def warn_missing(shards: Sequence[str], source: str) -> None:
    """Warn once, naming them, about local shards that do not exist; raise if none exists.

    A missing shard is skipped while reading (counted as ``missing_shard``); a list where all
    are missing cannot train.
    """
    local = [s for s in shards if shard_kind(s) == LOCAL]
    missing = [s for s in local if not os.path.exists(local_path(s))]
    if not missing:
        return
    if len(missing) == len(shards):
        raise ValueError(f"source {source!r}: none of its {len(shards)} shards exist: "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    names = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10
                                       else "")
    warnings.warn(f"source {source!r}: {len(missing)} of {len(shards)} shards do not exist and "
                  f"will be skipped (counted as missing_shard): {names}", UserWarning,
                  stacklevel=3)


def open_shards(urls: Iterable[str], handler: Callable[[BaseException], bool], source: str,
                allow_pipe: bool = False, allow_remote: bool = False) -> Iterator[dict]:
    """``{"url", "stream"}`` per shard, like webdataset's ``url_opener`` but local files are
    opened with ``open()`` and other kinds only when allowed. Each stream is closed once the
    consumer moves on. Open errors go to ``handler`` (True: skip the shard)."""
    for url in urls:
        kind = check_shard(url, source, allow_pipe, allow_remote)
        try:
            stream = open(local_path(url), "rb") if kind == LOCAL else gopen(url, "rb")
        except Exception as exn:
            exn.args = (*exn.args, url)
            if handler(exn):
                continue
            break
        try:
            yield {"url": url, "stream": stream}
        finally:
            stream.close()


def shard_samples(urls: Iterable[str], handler: Callable[[BaseException], bool], source: str,
                  allow_pipe: bool = False, allow_remote: bool = False) -> Iterator[dict]:
    """Raw samples (``{"__key__", ext: bytes, ...}``) of tar shards read in order."""
    streams = open_shards(urls, handler, source, allow_pipe, allow_remote)
    return group_by_keys(tar_file_expander(streams, handler=handler), handler=handler)
