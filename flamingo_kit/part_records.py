"""What ``save_pretrained`` records about each frozen part, and how ``from_pretrained`` finds,
loads and verifies it.

A part's record in ``config.json``::

    {"path": "lm",                        # relative to the saved directory where possible
     "saved_at": "/abs/path/of/the/part", # only for parts outside the directory
     "sha256": "...", "dtype": "float32", # fingerprint of the weights (None: the part trains)
     "config": {...},                     # the part's config, compared key by key
     "context_length": 512}               # LM only: its maximum positions

plus ``"trained": true`` for a part that trains (its weights are in ``model.safetensors``).

See :mod:`flamingo_kit.fingerprint` for what the hash covers and why.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from flamingo_kit.backbones import lm_context_length, load_lm, load_vision
from flamingo_kit.fingerprint import (
    config_differences,
    config_summary,
    weights_dtype,
    weights_sha256,
)
from flamingo_kit.lm_integration import bare_lm_state_dict

PART_NAMES = {"lm": "LM", "vision": "vision tower"}


class PartMismatchError(ValueError):
    """A frozen part does not match the fingerprint recorded when the model was saved."""


# -- writing a record ------------------------------------------------------------------------


def part_state(kind: str, part: nn.Module) -> dict[str, torch.Tensor]:
    """The part's weights under its own names (the LM without our wrappers and adapters)."""
    return bare_lm_state_dict(part) if kind == "lm" else part.state_dict()


def fingerprint(kind: str, part: PreTrainedModel, trained: bool) -> dict[str, Any]:
    """The record's fingerprint fields for a part (weights hash skipped when the part trains:
    its weights are saved in ``model.safetensors`` and the part only supplies the architecture).
    """
    state = part_state(kind, part)
    record: dict[str, Any] = {
        "sha256": None if trained else weights_sha256(state),
        "dtype": weights_dtype(state),
        "config": config_summary(part.config),
    }
    if trained:
        record["trained"] = True
    if kind == "lm":
        record["context_length"] = lm_context_length(part.config)
    return record


def write_part(kind: str, part: PreTrainedModel, target: str) -> None:
    """Write the part as a plain HF checkpoint (config + safetensors) to ``target``."""
    part.save_pretrained(target, state_dict=part_state(kind, part))


def record_part(kind: str, part: PreTrainedModel, source: dict[str, Any], trained: bool,
                directory: str, self_contained: bool) -> dict[str, Any]:
    """The record of part ``kind`` for a model saved in ``directory``.

    The part is written to ``directory/kind`` when ``self_contained`` or when it has no
    directory of its own (built from a config); otherwise the record points at its source.
    """
    target = os.path.join(directory, kind)
    if self_contained or "path" not in source:
        # A part loaded from this very place is already there (and may be memory-mapped).
        if "path" not in source or os.path.realpath(source["path"]) != os.path.realpath(target):
            write_part(kind, part, target)
        where = {"path": kind}
    else:
        where = location(source, directory)
    return {**where, **fingerprint(kind, part, trained)}


def location(source: dict[str, Any], directory: str) -> dict[str, Any]:
    """Where a part outside ``directory`` is: relative to it, and where it was when saved."""
    absolute = os.path.abspath(source["path"])
    try:
        relative = os.path.relpath(absolute, os.path.abspath(directory))
    except ValueError:  # another drive (Windows): no relative path exists
        return {"path": absolute}
    return {"path": relative, "saved_at": absolute}


# -- loading a recorded part -----------------------------------------------------------------


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _candidates(record: dict[str, Any], directory: str) -> list[str]:
    paths = []
    if record.get("path"):
        paths.append(os.path.normpath(os.path.join(directory, record["path"])))
    if record.get("saved_at"):
        paths.append(record["saved_at"])
    return list(dict.fromkeys(paths))


def load_recorded_part(
    kind: str,
    record: dict[str, Any],
    directory: str,
    override: nn.Module | str | os.PathLike | None = None,
    verify: bool = True,
    allow_different: bool = False,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Load part ``kind`` ("lm" or "vision") of the model saved in ``directory`` and verify it.

    ``override`` (a module or a local directory) replaces the recorded location; otherwise the
    recorded path relative to ``directory`` is tried first, then where the part was when saved,
    and the first that verifies wins. Parts inside ``directory`` load from safetensors only.
    Returns the part and its in-memory source.
    """
    loader = load_lm if kind == "lm" else load_vision
    dtype = _recorded_dtype(record, directory) if verify else None
    if isinstance(override, nn.Module):
        part, source = loader(override)
        if verify:
            _verify(kind, part, record, directory, "the given module", allow_different)
        return part, source
    if override is not None:
        paths = [os.fspath(override)]
    else:
        paths = [p for p in _candidates(record, directory) if os.path.isdir(p)]
    if not paths:
        tried = " nor ".join(repr(p) for p in _candidates(record, directory)) or "(no path)"
        raise FileNotFoundError(
            f"{directory}: the {PART_NAMES[kind]} this model was saved with is not at {tried}. "
            f"Point at it with FlamingoModel.from_pretrained({directory!r}, "
            f"{kind}=<directory or module>), or save the model with "
            "save_pretrained(..., self_contained=True) so its directory holds every part."
        )
    first_error = None
    for path in paths:
        part, source = loader(path, dtype, safetensors_only=_inside(path, directory))
        if not verify:
            return part, source
        try:
            _verify(kind, part, record, directory, repr(path), allow_different)
            return part, source
        except PartMismatchError as error:
            first_error = first_error or error
    raise first_error


def _recorded_dtype(record: dict[str, Any], directory: str) -> torch.dtype | None:
    name = record.get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if name is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"{directory}/config.json: {name!r} is not a torch dtype")
    return dtype


def _verify(kind: str, part: PreTrainedModel, record: dict[str, Any], directory: str,
            where: str, allow_different: bool) -> None:
    """Compare ``part`` with its record; raise (or warn when ``allow_different``) on mismatch."""
    problems = []
    changed = config_differences(record.get("config") or {}, config_summary(part.config))
    if changed:
        problems.append(f"config differs ({'; '.join(changed)})")
    if not record.get("trained"):
        if not isinstance(record.get("sha256"), str):
            raise PartMismatchError(f"{directory}/config.json: the {kind} record has no sha256 "
                                    "fingerprint; the file was edited or is damaged")
        state = part_state(kind, part)
        found = weights_sha256(state)
        if found != record["sha256"]:
            detail = f"weights sha256 {found[:12]}... != recorded {record['sha256'][:12]}..."
            dtype = weights_dtype(state)
            if record.get("dtype") and dtype != record["dtype"]:
                detail += (f" (its weights are {dtype}, the recorded ones {record['dtype']}: pass "
                           f"the part in {record['dtype']} and choose the model's dtype with "
                           "from_pretrained(..., dtype=))")
            problems.append(detail)
    if not problems:
        return
    mismatch = (f"the {PART_NAMES[kind]} at {where} is not the one the model in {directory} was "
                f"saved with: {'; '.join(problems)}")
    if allow_different:
        warnings.warn(f"{mismatch} (loaded anyway: allow_different_parts=True)", stacklevel=4)
        return
    raise PartMismatchError(
        f"{mismatch}. Point at the right one with FlamingoModel.from_pretrained({directory!r}, "
        f"{kind}=<directory or module>), or pass allow_different_parts=True to load a different "
        "part on purpose."
    )
