"""The FeatSharp file: one safetensors file holding the upsampler's weights, its PHI-S and its metadata.

``radio-dist featsharp train`` writes ``OUT/featsharp.safetensors``; a teacher spec with ``adaptation:
featsharp`` names it in ``options.featsharp``. The file's sha256 (not its path) is part of that teacher's
fingerprint, and it records which teacher model it was trained for (``teacher_model_key``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch

from radio_dist.featsharp.model import FeatSharp, UpsamplerConfig
from radio_dist.phis import PhiS
from radio_dist.teacher import TeacherSpec, fingerprint

FORMAT = "radio-dist-featsharp/1"
FEATSHARP_OPTION = "featsharp"  # the spec option holding the file (adaptation featsharp)


@dataclass
class LoadedFeatSharp:
    model: FeatSharp
    phis: PhiS
    meta: dict[
        str, Any
    ]  # format, teacher spec + fingerprint, low px, factor, upsampler config, held-out photos

    @property
    def factor(self) -> int:
        return int(self.meta["factor"])

    @property
    def low_px(self) -> int:
        return int(self.meta["low"])


def read_file_bytes(path: str) -> bytes:
    try:
        with fsspec.open(path, "rb") as f:
            return bytes(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"FeatSharp file {path} does not exist — train one with `radio-dist featsharp train` and point "
            f"options.{FEATSHARP_OPTION} at OUT/featsharp.safetensors"
        ) from None


def featsharp_checksum(path: str) -> str:
    """sha256 of a FeatSharp file: part of the fingerprint of a teacher that caches through it."""
    return hashlib.sha256(read_file_bytes(path)).hexdigest()


def teacher_model_key(spec: TeacherSpec) -> str:
    """What a FeatSharp file must match: the teacher's model (family, arch, weights, normalization, tokens,
    options), not its store name or the partitions it is cached at."""
    return fingerprint(spec.model_copy(update={"name": "teacher", "resolution": {}, "only_partitions": None}))


def featsharp_bytes(model: FeatSharp, phis: PhiS, meta: dict[str, Any]) -> bytes:
    """One safetensors file: the upsampler's weights, its PHI-S, and the metadata as JSON."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update(
        {f"phis.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in phis.to_arrays().items()}
    )
    return bytes(save(tensors, metadata={"format": FORMAT, "meta": json.dumps(meta, sort_keys=True)}))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (header: u64 little-endian length, then JSON)."""
    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + n]).get("__metadata__") or {})


def load_featsharp(path: str, device: str | torch.device = "cpu") -> LoadedFeatSharp:
    """A FeatSharp file written by ``radio-dist featsharp train``; a clear error for anything else."""
    from safetensors.torch import load

    data = read_file_bytes(path)
    try:
        md = _safetensors_metadata(data)
        tensors = load(data)
    except Exception as e:  # safetensors and json raise their own error types for foreign bytes
        raise ValueError(
            f"FeatSharp file {path} is not a safetensors file ({type(e).__name__}: {e})"
        ) from None
    if md.get("format") != FORMAT:
        raise ValueError(
            f"FeatSharp file {path} has format {md.get('format')!r}, expected {FORMAT!r} "
            "(written by `radio-dist featsharp train`)"
        )
    meta = json.loads(md["meta"])
    model = FeatSharp(UpsamplerConfig(**meta["upsampler"]))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    phis = PhiS.from_arrays({k[5:]: v.numpy() for k, v in tensors.items() if k.startswith("phis.")})
    return LoadedFeatSharp(model.eval().requires_grad_(False).to(device), phis, meta)
