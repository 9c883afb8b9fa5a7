"""The registry the on-disk forms add themselves to (read by `lmlab.model.loading`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Format:
    """One on-disk form: `detect(path)` says whether `path` is in this form (without reading
    the weights); `load_model(path, device)` returns it as a `torch.nn.Module`."""

    name: str
    detect: Callable[[Path], bool]
    load_model: Callable[[Path, str], torch.nn.Module]


FORMATS: dict[str, Format] = {}


def register_format(
    name: str,
    detect: Callable[[Path], bool],
    load_model: Callable[[Path, str], torch.nn.Module],
) -> Format:
    """Add (or, under the same name, replace) the reader of one on-disk form. Detectors
    must not overlap: each path is in one form, so the order of registration is moot."""
    fmt = Format(name, detect, load_model)
    FORMATS[name] = fmt
    return fmt
