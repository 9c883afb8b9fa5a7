"""One loader for every on-disk form of a model: the loader registry (DESIGN.md's seam).

Each form (an lmlab checkpoint, a quantized checkpoint, a Hugging Face directory, ...) is
one small module in `lmlab.model.formats` that calls `register_format` with a `detect`
and a `load_model`. `load_model` asks every registered form whether it reads the path
(or a run directory's newest model) and hands the path to the one that does; adding a
form is adding a file to that package, never an edit here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.errors import UsageError

# a run directory's models, newest stage first
RUN_MODELS = ("sft/model", "pretrain/model")


@dataclass(frozen=True)
class Format:
    """One on-disk form: `detect(path)` says whether `path` is in this form (without reading
    the weights); `load_model(path, device)` returns it as a `torch.nn.Module`."""

    name: str
    detect: Callable[[Path], bool]
    load_model: Callable[[Path, str], torch.nn.Module]


_FORMATS: dict[str, Format] = {}


def register_format(
    name: str,
    detect: Callable[[Path], bool],
    load_model: Callable[[Path, str], torch.nn.Module],
) -> Format:
    """Add (or, under the same name, replace) the reader of one on-disk form. Detectors
    must not overlap: each path is in one form, so the order of registration is moot."""
    fmt = Format(name, detect, load_model)
    _FORMATS[name] = fmt
    return fmt


def formats() -> list[Format]:
    """Every registered form; the first call imports the `formats` package, whose modules
    register themselves."""
    import lmlab.model.formats  # noqa: F401

    return list(_FORMATS.values())


def find_format(path: str | Path) -> tuple[Format, Path]:
    """The form `path` is in, and where its model is: `path` itself, or in a run
    directory, the SFT model if there is one, else the pre-trained one."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such checkpoint or run directory")
    known = formats()
    for cand in (p, *(p / run_model for run_model in RUN_MODELS)):
        for fmt in known:
            if fmt.detect(cand):
                return fmt, cand
    raise UsageError(f"{p}: not a checkpoint (no config.json) nor a run with a trained model")


def resolve_checkpoint(path: str | Path) -> Path:
    """A model path as given, or a run directory's newest model (SFT if present, else base)."""
    return find_format(path)[1]


def load_model(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """Load a model in any registered form (an lmlab checkpoint, a quantized checkpoint, a
    Hugging Face model directory) or a run directory's newest model, in eval mode."""
    fmt, where = find_format(path)
    return fmt.load_model(where, device)
