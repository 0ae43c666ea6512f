"""Weights files — teachers', students' — read as state dicts, never running pickled code, and a bad file
named in one line: missing, unreadable, truncated or not a weights file at all.

``check_weights_file`` reads only what tells a file's format apart (a safetensors header, a zip directory),
so a multi-gigabyte checkpoint is checked before a loader (timm's, for instance) spends minutes on it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

SAFETENSORS = ".safetensors"
ZIP_FORMATS = (".npz",)  # numpy archives: a zip like torch's own format


class WeightsError(ValueError):
    """A weights file that cannot be used: the message names the file, what is wrong and what to do."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """The weights file is not there (also a ``FileNotFoundError``)."""


def _bad(path: Path, problem: str, cls: type[WeightsError] = WeightsError) -> WeightsError:
    return cls(
        f"weights file {path}: {problem} — download or convert it again (see the README's weights section) "
        "and point the config's weights path at it"
    )


DEEP_CHECK_BYTES = 1 << 30  # legacy torch pickles up to this size are read whole by a deep check


def check_weights_file(path: str | Path, deep: bool = False) -> Path:
    """``path`` as a readable weights file, else ``WeightsError``. A safetensors file must have a complete
    header; a torch (``.pt``/``.pth``/``.bin``) or ``.npz`` file must be a whole zip (torch's format since 1.6;
    a truncated one lacks its directory) or a legacy torch pickle. A legacy pickle has no index to check, so
    ``deep`` (the driver, before it starts the actors that load it) reads one of up to ``DEEP_CHECK_BYTES``
    whole."""
    p = Path(path).expanduser()
    if not p.exists():
        raise _bad(p, "does not exist", MissingWeightsError)
    if not p.is_file():
        raise _bad(p, "is not a file")
    if not os.access(p, os.R_OK):
        raise _bad(p, "is not readable (permission denied)")
    if p.stat().st_size == 0:
        raise _bad(p, "is empty")
    if p.suffix == SAFETENSORS:
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error type for every malformed header
            raise _bad(p, f"is not a valid safetensors file ({_first_line(e)})") from None
        return p
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise _bad(p, f"is a damaged archive ({_first_line(e)})") from None
        return p
    if p.suffix in ZIP_FORMATS:
        raise _bad(p, f"is not a valid {p.suffix} archive (truncated or another format)")
    with open(p, "rb") as f:
        head = f.read(2)
    if head[:1] != b"\x80":  # a legacy torch.save file is a pickle: protocol opcode first
        raise _bad(p, "is not a safetensors or torch file (truncated, or another format)")
    if deep and p.stat().st_size <= DEEP_CHECK_BYTES:
        read_state_dict(p)
    return p


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or torch file (``weights_only``: tensors and plain containers only),
    unwrapped from a ``state_dict`` / ``model`` / ``module`` entry if the file nests it."""
    p = check_weights_file(path)
    try:
        if p.suffix == SAFETENSORS:
            from safetensors.torch import load_file

            return load_file(str(p))
        sd: Any = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, a zip member cut short, a refused (code-carrying) object
        raise _bad(p, f"could not be read as weights ({_first_line(e)})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise _bad(p, "holds no state dict (a mapping of names to tensors)")
    return sd


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
