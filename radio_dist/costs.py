"""The bill before the run: what a job costs, computed from its config alone (``radio-dist plan``).

Nothing runs and no weights are read: every model is built on PyTorch's ``meta`` device (shapes, no memory) to
learn its parameter count, depth, width and output shapes. The arithmetic is REFERENCE.md's "Cost arithmetic":

- **Forward FLOPs of a transformer** per input ≈ ``2·P·N + 4·Σ_l N·A_l·D`` — P parameters, N tokens (patches plus
  prefix tokens), D the width, A_l the tokens each token attends to in block l: N for global attention, which
  makes the sum REFERENCE's ``2·params·tokens + 4·layers·tokens²·width``; a windowed block (SAM3: 28 of 32
  blocks in 24×24 windows) attends to its window only. DINOv3-7B at 1024 px: 66.1 TFLOP; SigLIP2-g at 384: 1.40;
  SAM3's encoder at 1008: 5.40 (tests/test_costs.py checks these by hand).
- **C-RADIO students**: the same formula for the ViT, plus ``2·params·tokens`` for each adaptor head (dense
  heads on every patch token, summary heads on one).
- **Other models** (CNN teachers, timm students): FLOPs counted by ``torch.utils.flop_counter`` on a
  meta-device forward (a multiply-add is 2 FLOPs, as above); on a ViT it agrees with the formula (tested).
- **Adaptations**: SAM3's mosaic runs one native input for k² views (1/k² of a native forward per view);
  FeatSharp's high partition runs the teacher on the low view and u×u tiles: (1 + u²) low-res forwards (the
  upsampler's own forward is not counted: one fusion block on the high-res grid, small beside 10 teacher passes).
- **Training** ≈ 3× forward (forward + backward); MESA adds one EMA forward.
- **Online vs cached** over E epochs: online pays teachers and students every epoch, cached pays the teachers
  once: ``E·(T + ΣS) / (T + E·ΣS)`` (REFERENCE's example, ≈ 5.5× at E = 10 for T ≈ 72.8, ΣS ≈ 7.25 TFLOP; the
  text there writes the numerator E·T + ΣS, its own figure is this one). With several partitions the cache runs
  every partition of a row once (T_all) while online runs the teachers of the step's partition (T_step):
  ``E·(T_step + ΣS) / (T_all + E·ΣS)``.
- **GPU time** = FLOPs / (the GPU's dense bf16 datasheet rate × MFU); MFU is stated, never measured here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from radio_dist.cache.config import CacheJobConfig
from radio_dist.featsharp.train import FeatSharpConfig
from radio_dist.store.codecs import get_codec
from radio_dist.store.records import StoreMeta
from radio_dist.teacher import (
    Teacher,
    TeacherSpec,
    WeightsKind,
    WeightsSpec,
    create_teacher,
    spec_from_record,
)
from radio_dist.train.config import DistillConfig
from radio_dist.train.parallel import PEAK_BF16_TFLOPS
from radio_dist.train.students import CRadioBackbone, StudentSpec, TeacherHeadInfo, build_student

DEFAULT_GPU = "H100"
DEFAULT_MFU = 0.4
SUMMARY_BYTES = 4  # summaries are stored as float32 (what the reader reads)
# Canonical views stored encoded: bits per pixel measured by `radio-dist bench views` on the sample photos at
# 224 px (docs/benchmarks.md, 2026-12-03; at 1152 px the sample photos are upsampled and compress better than
# real photos would, so the 224 px rate is used for every size). Other qualities are not estimated.
VIEW_BITS_PER_PIXEL = {
    "png": 73.6e3 * 8 / 224**2,
    "jpeg-95": 26.3e3 * 8 / 224**2,
    "jpeg-90": 14.5e3 * 8 / 224**2,
    "jpeg-75": 8.8e3 * 8 / 224**2,
    "webp-90": 11.4e3 * 8 / 224**2,
}
MOSAIC_K = "mosaic_k"


class PlanError(ValueError):
    """The job cannot be costed as configured; the message names the setting."""


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_tflops: float
    mfu: float

    @property
    def flops_per_s(self) -> float:
        return self.peak_tflops * 1e12 * self.mfu

    def hours(self, flops: float) -> float:
        return flops / self.flops_per_s / 3600.0


def gpu(name: str = DEFAULT_GPU, mfu: float = DEFAULT_MFU, peak_tflops: float | None = None) -> Gpu:
    """A named GPU at a stated MFU (``peak_tflops`` for one the table does not know)."""
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu {mfu}: give the model FLOPs utilization as a fraction in (0, 1], e.g. 0.4")
    if peak_tflops is None:
        match = next((k for k in PEAK_BF16_TFLOPS if k.lower() == name.lower()), None)
        if match is None:
            raise PlanError(
                f"--gpu {name!r}: no datasheet rate known; use one of {sorted(PEAK_BF16_TFLOPS)} or give "
                "--peak-tflops (its dense bf16 TFLOP/s)"
            )
        return Gpu(match, PEAK_BF16_TFLOPS[match], mfu)
    if peak_tflops <= 0:
        raise PlanError(f"--peak-tflops {peak_tflops}: must be > 0")
    return Gpu(name, peak_tflops, mfu)


# -- FLOPs --------------------------------------------------------------------------------------------------


def transformer_flops(params: float, tokens: int, width: int, attended: list[int]) -> float:
    """Forward FLOPs of one input: ``2·params·tokens + 4·Σ_l tokens·attended_l·width`` (REFERENCE.md).

    ``attended``: per block, the tokens each token attends to (``tokens`` for global attention)."""
    return 2.0 * params * tokens + 4.0 * tokens * width * float(sum(attended))


def counted_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn`` as ``torch.utils.flop_counter`` counts them (meta tensors: nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def meta_input(px: int) -> torch.Tensor:
    return torch.empty(1, 3, px, px, device="meta")


@dataclass
class ModelForward:
    """One model's forward on one square input: FLOPs, how they were obtained, output shapes."""

    px: int
    flops: float
    method: str  # formula | counted
    dense: tuple[int, int, int]  # h, w, C
    summary_dim: int | None


def meta_teacher(spec: TeacherSpec) -> MetaTeacher:
    """The spec's :class:`MetaTeacher`, built once per process for each spec (a 7B model takes seconds)."""
    return _meta_teacher(spec.model_dump_json())


@functools.lru_cache(maxsize=32)
def _meta_teacher(spec_json: str) -> MetaTeacher:
    return MetaTeacher(TeacherSpec.model_validate_json(spec_json))


class MetaTeacher:
    """A teacher's model built on the meta device from its spec (no weights read), for shapes and FLOPs."""

    def __init__(self, spec: TeacherSpec) -> None:
        self.spec = spec
        base = spec.without_adaptation().model_copy(
            update={"weights": WeightsSpec(kind=WeightsKind.none, seed=0)}
        )
        try:
            with torch.device("meta"):
                self.teacher: Teacher = create_teacher(base, "meta")
        except (ValueError, KeyError, RuntimeError) as e:
            raise PlanError(f"teacher {spec.name!r}: cannot build {spec.family} {spec.arch}: {e}") from None
        self._cache: dict[int, ModelForward] = {}

    def forward(self, px: int) -> ModelForward:
        if px not in self._cache:
            self._cache[px] = self._forward(px)
        return self._cache[px]

    def _forward(self, px: int) -> ModelForward:
        t = self.teacher
        out = t.features(meta_input(px))  # shapes only
        _, h, w, c = out.dense.shape
        summary = None if out.summary is None else int(out.summary.shape[-1])
        model = getattr(t, "model", None)
        blocks = getattr(model, "blocks", None)
        width = getattr(model, "embed_dim", None)
        if model is None or blocks is None or not isinstance(width, int):
            counted = counted_flops(lambda: t.features(meta_input(px)))
            return ModelForward(px, counted, "counted", (h, w, c), summary)
        params = sum(p.numel() for p in model.parameters())
        tokens = h * w + int(getattr(model, "num_prefix_tokens", 0) or 0)
        window = getattr(t, "window", None)
        global_blocks = getattr(t, "global_blocks", None)
        attended = [
            tokens
            if window is None or global_blocks is None or i in global_blocks
            else min(window * window, tokens)
            for i in range(len(blocks))
        ]
        return ModelForward(
            px, transformer_flops(params, tokens, width, attended), "formula", (h, w, c), summary
        )


# -- teachers: one row's cost and bytes per partition -------------------------------------------------------


@dataclass
class TeacherPartition:
    """What one teacher costs and stores for one row at one partition."""

    teacher: str
    partition: str
    view_px: int
    input_px: int
    model_px: int  # the size the model itself runs at (the mosaic's native input; FeatSharp's low view)
    model_inputs: float  # model forwards per row (1/k² with a mosaic, 1 + u² through FeatSharp)
    flops: (
        float | None
    )  # forward FLOPs per row (None: not known, a store's teacher this version cannot build)
    method: str
    dense: tuple[int, int, int]
    summary_dim: int | None
    codec: str
    note: str = ""

    @property
    def cost(self) -> float:
        """The forward FLOPs of a row, known (the caching job's own teachers always are)."""
        if self.flops is None:
            raise PlanError(
                f"teacher {self.teacher!r}: its FLOPs are not known (this version cannot build it)"
            )
        return self.flops

    def target_bytes(self, codec: str | None = None) -> float:
        h, w, c = self.dense
        per_token = get_codec(codec or self.codec).bytes_per_token(c)
        return h * w * per_token + (self.summary_dim or 0) * SUMMARY_BYTES


def teacher_partition(
    meta: MetaTeacher, partition: str, view_px: int, codec: str, featsharp_low: int | None
) -> TeacherPartition:
    spec = meta.spec
    px = spec.resolution.get(partition, view_px)
    name = spec.name
    if spec.adaptation == "mosaic":
        k = int(spec.options.get(MOSAIC_K, 1))
        native = int(spec.options.get("img_size", px))
        if px not in (native, native // k) or native % k:
            raise PlanError(
                f"teacher {name!r}: a mosaic runs {native} px inputs, alone or as {k}x{k} views of {native // k} px; "
                f"partition {partition!r} gives it {px} px (set its resolution.{partition})"
            )
        if px * k == native and k > 1:
            f = meta.forward(native)
            h, w, c = f.dense
            return TeacherPartition(
                name, partition, view_px, px, native, 1 / k**2, f.flops / k**2, f.method, (h // k, w // k, c),
                f.summary_dim, codec, f"mosaic {k}×{k} at {native} px",
            )  # fmt: skip
    if spec.adaptation == "featsharp" and featsharp_low is not None and px != featsharp_low:
        u = px // featsharp_low
        if u < 2 or u * featsharp_low != px:
            raise PlanError(
                f"teacher {name!r}: FeatSharp runs at factor × its low size ({featsharp_low} px); partition "
                f"{partition!r} asks {px} px"
            )
        f = meta.forward(featsharp_low)
        h, w, c = f.dense
        return TeacherPartition(
            name, partition, view_px, px, featsharp_low, 1 + u * u, (1 + u * u) * f.flops, f.method,
            (h * u, w * u, c), f.summary_dim, codec, f"FeatSharp ×{u}: low view + {u * u} tiles at {featsharp_low} px",
        )  # fmt: skip
    f = meta.forward(px)
    return TeacherPartition(
        name, partition, view_px, px, px, 1.0, f.flops, f.method, f.dense, f.summary_dim, codec
    )


@dataclass
class CacheShape:
    """What a store holds per row, from a caching job's config or a store's store.json."""

    partitions: dict[str, int]
    teachers: dict[str, TeacherSpec]
    codecs: dict[tuple[str, str], str]  # (teacher, partition) -> codec
    view_codec: str
    rows_per_image: int
    runtime: dict[str, tuple[int, float]] = field(default_factory=dict)  # teacher -> (pool_size, num_gpus)
    parts: list[TeacherPartition] = field(default_factory=list)

    def costed(self) -> CacheShape:
        metas = {n: meta_teacher(s) for n, s in self.teachers.items()}
        self.parts = []
        for name, spec in self.teachers.items():
            low = featsharp_low_px(spec, self.partitions)
            for p, size in self.partitions.items():
                if spec.only_partitions is not None and p not in spec.only_partitions:
                    continue
                self.parts.append(teacher_partition(metas[name], p, size, self.codecs[(name, p)], low))
        return self

    def view_bytes(self, partition: str, codec: str | None = None) -> float | None:
        px = self.partitions[partition]
        codec = codec or self.view_codec
        if codec == "raw":
            return float(px * px * 3)
        bpp = VIEW_BITS_PER_PIXEL.get(codec)
        return None if bpp is None else px * px * bpp / 8

    def part(self, teacher: str, partition: str) -> TeacherPartition | None:
        return next((t for t in self.parts if t.teacher == teacher and t.partition == partition), None)


def featsharp_low_px(spec: TeacherSpec, partitions: dict[str, int]) -> int | None:
    """The low size a FeatSharp teacher runs at alone: its smallest input size over the partitions."""
    if spec.adaptation != "featsharp":
        return None
    return min(spec.resolution.get(p, size) for p, size in partitions.items())


def cache_shape(cfg: CacheJobConfig) -> CacheShape:
    parts = cfg.pipeline.partitions
    return CacheShape(
        partitions=dict(parts),
        teachers={t.name: t for t in cfg.teachers},
        codecs={(t.name, p): cfg.codec_name(t.name, p) for t in cfg.teachers for p in parts},
        view_codec=cfg.pipeline.view_codec,
        rows_per_image=cfg.source.augment.views,
        runtime={t.name: (t.runtime.pool_size, t.runtime.num_gpus) for t in cfg.teachers},
    ).costed()


def store_shape(meta: StoreMeta) -> CacheShape:
    """A store's shape from its store.json: bytes from the shapes it recorded; FLOPs from the teacher specs it
    recorded where this installation can build them (None where not: a family it lacks)."""
    shape = CacheShape(
        partitions=dict(meta.partitions),
        teachers={},
        codecs={(t, p): rec.codec_name(p) for t, rec in meta.teachers.items() for p in meta.partitions},
        view_codec=meta.view_codec,
        rows_per_image=1,
    )
    for name, rec in meta.teachers.items():
        built: MetaTeacher | None = None
        try:
            spec = spec_from_record({**rec.spec, "name": name})
            shape.teachers[name] = spec
            built = meta_teacher(spec)
        except (ValueError, PlanError):
            built = None
        for p, size in meta.partitions.items():
            shapes = rec.outputs.get(p)
            if shapes is None:
                continue
            dense = (int(shapes.dense[0]), int(shapes.dense[1]), int(shapes.dense[2]))
            codec = shape.codecs[(name, p)]
            if built is None:
                part = TeacherPartition(
                    name, p, size, size, size, 1.0, None, "unknown", dense, shapes.summary_dim, codec
                )
            else:
                part = teacher_partition(built, p, size, codec, featsharp_low_px(built.spec, meta.partitions))
                part.dense, part.summary_dim = dense, shapes.summary_dim  # what was stored
            shape.parts.append(part)
    return shape


# -- the caching job's bill ---------------------------------------------------------------------------------


def plan_cache(cfg: CacheJobConfig, images: int, g: Gpu) -> dict[str, Any]:
    shape = cache_shape(cfg)
    k = shape.rows_per_image
    rows = images * k
    entries = []
    for t in shape.parts:
        entries.append(
            {
                "teacher": t.teacher,
                "partition": t.partition,
                "view_px": t.view_px,
                "input_px": t.input_px,
                "model_px": t.model_px,
                "model_inputs_per_row": t.model_inputs,
                "note": t.note,
                "dense": list(t.dense),
                "summary_dim": t.summary_dim,
                "tflop_per_row": t.cost / 1e12,
                "flops_from": t.method,
                "gpu_hours": g.hours(t.cost * rows),
                "codec": t.codec,
                "bytes_per_row": t.target_bytes(),
                "bytes_per_row_by_codec": {c: t.target_bytes(c) for c in ("fp16", "int8", "nf4")},
            }
        )
    view_bytes = {p: shape.view_bytes(p) for p in shape.partitions}
    views = {
        p: {"codec": shape.view_codec, "bytes_per_row": b, "raw_bytes_per_row": shape.view_bytes(p, "raw")}
        for p, b in view_bytes.items()
    }
    view_row = sum(b or 0.0 for b in view_bytes.values())
    target_row = sum(t.target_bytes() for t in shape.parts)
    by_codec = {
        c: sum(t.target_bytes(c) for t in shape.parts) + view_row for c in ("fp16", "int8", "nf4")
    }  # every target under one codec (views as configured)
    all_flops = sum(t.cost for t in shape.parts)
    row_bytes = view_row + target_row
    pools: list[dict[str, Any]] = []
    rates: dict[str, float] = {}  # teacher -> rows/s of its pool (GPU pools only)
    gpus: dict[str, float] = {}
    flops: dict[str, float] = {}
    for name in shape.teachers:
        pool, per_actor = shape.runtime.get(name, (1, 0.0))
        flops[name] = sum(t.cost for t in shape.parts if t.teacher == name)
        gpus[name] = pool * per_actor
        if gpus[name] and flops[name]:
            rates[name] = gpus[name] * g.flops_per_s / flops[name]
        pools.append(
            {
                "teacher": name,
                "gpus": gpus[name],
                "tflop_per_row": flops[name] / 1e12,
                "gpu_hours": g.hours(flops[name] * rows),
                "rows_per_s": rates.get(name),
            }
        )
    total_gpus = sum(gpus.values())
    pipeline: dict[str, Any] = {"gpus": total_gpus}
    if total_gpus and len(rates) == len(shape.teachers):
        bottleneck = min(rates, key=lambda n: rates[n])
        rate = rates[bottleneck]
        pipeline |= {
            "rows_per_s": rate,
            "bottleneck": bottleneck,
            "wall_hours": rows / rate / 3600,
            "write_bytes_per_s": rate * row_bytes,
            "balanced_rows_per_s": total_gpus * g.flops_per_s / all_flops,
            "balanced_gpus": {n: total_gpus * f / all_flops for n, f in flops.items()},
        }
    return {
        "job": "cache-teachers",
        "gpu": asdict(g),
        "images": images,
        "rows_per_image": k,
        "rows": rows,
        "teachers": entries,
        "views": views,
        "pools": pools,
        "pipeline": pipeline,
        "per_image": {
            "tflop": all_flops * k / 1e12,
            "gpu_hours_total": g.hours(all_flops * rows),
            "target_bytes": target_row * k,
            "view_bytes": view_row * k,
            "bytes": row_bytes * k,
        },
        "total_bytes": row_bytes * rows,
        "total_bytes_by_codec": {c: b * rows for c, b in by_codec.items()},
    }


# -- the distillation job's bill ----------------------------------------------------------------------------


def resolution_mix(cfg: DistillConfig, shape: CacheShape) -> Iterator[tuple[str, int, float]]:
    """(partition, student px, probability) of a step, as ``sample_resolution`` draws them."""
    parts = cfg.partitions or sorted(shape.partitions)
    for p in parts:
        if p not in shape.partitions:
            raise PlanError(
                f"partitions: {p!r} is not a partition of the store (it has {sorted(shape.partitions)})"
            )
    sets = cfg.train.resolutions or {p: [shape.partitions[p]] for p in parts}
    weights = cfg.train.partition_weights or {p: 1.0 for p in sets}
    total = sum(weights.get(p, 0.0) for p in sets)
    if total <= 0:
        raise PlanError("train.partition_weights: at least one trained partition needs a weight > 0")
    for p, sizes in sets.items():
        for px in sizes:
            yield p, int(px), weights.get(p, 0.0) / total / len(sizes)


def matmul_params(module: torch.nn.Module) -> int:
    """Parameters of the module's linear and convolution layers: those multiplied with every token."""
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    return sum(
        p.numel() for m in module.modules() if isinstance(m, layers) for p in m.parameters(recurse=False)
    )


class MetaStudent:
    """A student (backbone and every head) built on the meta device, for its forward FLOPs.

    A C-RADIO student by the formula: its ViT (patch embed and blocks; N = patches + summary tokens + registers,
    windowed blocks attending to their window), its dense heads on every patch token, its summary heads on one
    token each. Other backbones (timm) counted on a meta-device forward."""

    def __init__(self, spec: StudentSpec, heads: dict[str, TeacherHeadInfo]) -> None:
        try:
            with torch.device("meta"):
                self.model = build_student(spec.model_copy(update={"weights": None}), heads)
        except (ValueError, RuntimeError) as e:
            raise PlanError(f"student {spec.name!r}: cannot build it: {e}") from None
        self.spec = spec

    def size(self, px: int) -> int:
        """The input the trainer gives a px step (rounded down to a multiple of the patch)."""
        p = self.model.patch_size
        return max(p, px // p * p)

    def forward_flops(self, px: int) -> float:
        m = self.model
        if not isinstance(m.backbone, CRadioBackbone):
            return self.counted_flops(px)
        bb = m.backbone
        g = self.size(px) // m.patch_size
        tokens = g * g + bb.num_prefix
        ws = self.spec.window_size
        attended = [tokens if glob or ws is None else min(ws * ws, tokens) for glob in bb.is_global]
        backbone = transformer_flops(matmul_params(bb), tokens, bb.embed_dim, attended)
        return backbone + 2.0 * matmul_params(m.dense_heads) * g * g + 2.0 * matmul_params(m.summary_heads)

    def counted_flops(self, px: int) -> float:
        return counted_flops(lambda: self.model(meta_input(self.size(px))))


def plan_distill(cfg: DistillConfig, shape: CacheShape, images: int, g: Gpu) -> dict[str, Any]:
    live_names = {t if isinstance(t, str) else t.name for t in cfg.live_teachers}
    stored = sorted({t.teacher for t in shape.parts})
    chosen = cfg.teachers if cfg.teachers is not None else stored
    cached = [t for t in chosen if t not in live_names]
    for name in cached + [t for t in cfg.live_teachers if isinstance(t, str)]:
        if name not in stored:
            raise PlanError(f"teacher {name!r} is not a teacher of the store (it has {stored})")
    live_specs: list[TeacherSpec] = []
    for t in cfg.live_teachers:
        if isinstance(t, str):
            if t not in shape.teachers:
                raise PlanError(f"live teacher {t!r}: the store's record of it cannot be built here")
            live_specs.append(shape.teachers[t])
        else:
            live_specs.append(t)
    mix = list(resolution_mix(cfg, shape))
    trained_parts = sorted({p for p, _, _ in mix})
    heads: dict[str, TeacherHeadInfo] = {}
    for t in cached:
        part = next((shape.part(t, p) for p in trained_parts if shape.part(t, p)), None)
        if part is None:
            raise PlanError(f"teacher {t!r} has no targets at the trained partitions {trained_parts}")
        heads[t] = TeacherHeadInfo(summary_dim=part.summary_dim, dense_dim=part.dense[2])
    live_shape = CacheShape(
        partitions=shape.partitions,
        teachers={s.name: s for s in live_specs},
        codecs={(s.name, p): "fp16" for s in live_specs for p in shape.partitions},
        view_codec=shape.view_codec,
        rows_per_image=1,
    ).costed()
    for lp in live_shape.parts:
        heads.setdefault(lp.teacher, TeacherHeadInfo(summary_dim=lp.summary_dim, dense_dim=lp.dense[2]))
    if not heads:
        raise PlanError("the job distills no teacher (teachers: [] and no live_teachers)")
    rows_per_epoch = images * (shape.rows_per_image if cfg.train.views.value == "all" else 1)
    global_batch = cfg.train.batch_size * cfg.scaling.num_workers
    steps = math.ceil(rows_per_epoch / global_batch) * cfg.train.epochs
    if cfg.train.max_steps is not None:
        steps = min(steps, cfg.train.max_steps)
    ema = 1.0 if cfg.train.mesa_weight > 0 else 0.0
    students = []
    per_part_s: dict[str, float] = {p: 0.0 for p in trained_parts}  # all students' train FLOPs per sample
    mean_s = 0.0
    for spec in cfg.students:
        by_px: dict[int, float] = {}
        mean_fwd = 0.0
        student = MetaStudent(spec, heads)
        for p, px, prob in mix:
            if px not in by_px:
                by_px[px] = student.forward_flops(px)
            mean_fwd += prob * by_px[px]
            per_part_s[p] += prob / part_prob(mix, p) * (3.0 + ema) * by_px[px]
        train_flops = (3.0 + ema) * mean_fwd
        mean_s += train_flops
        students.append(
            {
                "student": spec.name,
                "kind": spec.kind,
                "arch": spec.arch,
                "parallel": spec.parallel,
                "tflop_forward_by_px": {px: f / 1e12 for px, f in sorted(by_px.items())},
                "tflop_per_sample": train_flops / 1e12,
                "tflop_per_step": train_flops * global_batch / 1e12,
                "gpu_hours": g.hours(train_flops * global_batch * steps),
            }
        )
    live_step = {p: sum(t.cost for t in live_shape.parts if t.partition == p) for p in trained_parts}
    mean_live = sum(prob * live_step[p] for p, _, prob in mix)
    # what the read side must deliver per GPU, per partition: a sample's bytes over a sample's compute time
    reads = {}
    for p in trained_parts:
        targets = sum(t.target_bytes() for t in shape.parts if t.partition == p and t.teacher in cached)
        view = shape.view_bytes(p) or 0.0
        per_sample_s = (per_part_s[p] + live_step[p]) / g.flops_per_s
        reads[p] = {
            "bytes_per_sample": targets + view,
            "samples_per_s_per_gpu": 1 / per_sample_s,
            "read_bytes_per_s_per_gpu": (targets + view) / per_sample_s,
        }
    mean_bytes = sum(prob * reads[p]["bytes_per_sample"] for p, _, prob in mix)
    mean_time = (mean_s + mean_live) / g.flops_per_s
    # the cost ratio: the cached teachers run once per row at every partition in the cache, every epoch at the
    # step's partition online; students (and teachers live in both) are paid every epoch either way
    t_all = known_sum(t.flops for t in shape.parts if t.teacher in cached)
    steps_t = [
        known_sum(t.flops for t in shape.parts if t.partition == p and t.teacher in cached) for p, _, _ in mix
    ]
    t_step = (
        None
        if None in steps_t
        else sum(prob * f for (_, _, prob), f in zip(mix, steps_t, strict=True) if f is not None)
    )
    e = cfg.train.epochs
    s_all = mean_s + mean_live
    ratio = None if t_all is None or t_step is None else online_over_cached(e, t_step, t_all, s_all)
    return {
        "job": "distill",
        "gpu": asdict(g),
        "images": images,
        "rows_per_epoch": rows_per_epoch,
        "epochs": e,
        "global_batch": global_batch,
        "workers": cfg.scaling.num_workers,
        "steps": steps,
        "mesa": ema > 0,
        "resolutions": [{"partition": p, "px": px, "probability": prob} for p, px, prob in mix],
        "teachers": sorted(heads),
        "live_teachers": sorted(live_names),
        "students": students,
        "live_tflop_per_sample": mean_live / 1e12,
        "tflop_per_step": (mean_s + mean_live) * global_batch / 1e12,
        "gpu_hours": g.hours((mean_s + mean_live) * global_batch * steps),
        "wall_hours": g.hours((mean_s + mean_live) * global_batch * steps) / cfg.scaling.num_workers,
        "reads": reads,
        "read_bytes_per_s_per_gpu": mean_bytes / mean_time,
        "cached_vs_online": {
            "epochs": e,
            "teacher_tflop_per_row_cached": None if t_all is None else t_all / 1e12,
            "teacher_tflop_per_sample_online": None if t_step is None else t_step / 1e12,
            "students_tflop_per_sample": s_all / 1e12,
            "online_over_cached": ratio,
        },
    }


def known_sum(values: Iterable[float | None]) -> float | None:
    """The sum, or None when any term is unknown."""
    total = 0.0
    for v in values:
        if v is None:
            return None
        total += v
    return total


def online_over_cached(epochs: int, t_step: float, t_all: float, students: float) -> float | None:
    """E·(T_step + ΣS) / (T_all + E·ΣS): the online job's FLOPs over the cached one's (module docstring)."""
    denominator = t_all + epochs * students
    return epochs * (t_step + students) / denominator if denominator > 0 else None


def part_prob(mix: list[tuple[str, int, float]], partition: str) -> float:
    return sum(prob for p, _, prob in mix if p == partition) or 1.0


# -- FeatSharp's training job -------------------------------------------------------------------------------


def plan_featsharp(cfg: FeatSharpConfig, g: Gpu) -> dict[str, Any]:
    meta = meta_teacher(cfg.teacher)
    low = cfg.low_px
    u = cfg.upsampler.factor
    f = meta.forward(low)
    per_image = (1 + u * u + cfg.train.jitters) * f.flops  # low view, u² tiles, the jittered low views
    per_step = per_image * cfg.train.batch_size * cfg.scaling.num_workers
    return {
        "job": "featsharp",
        "gpu": asdict(g),
        "teacher": cfg.teacher.name,
        "low_px": low,
        "factor": u,
        "teacher_forwards_per_image": 1 + u * u + cfg.train.jitters,
        "tflop_per_teacher_forward": f.flops / 1e12,
        "steps": cfg.train.steps,
        "tflop_per_step": per_step / 1e12,
        "gpu_hours": g.hours(per_step * cfg.train.steps),
        "wall_hours": g.hours(per_step * cfg.train.steps) / cfg.scaling.num_workers,
        "note": "teacher forwards only; the upsampler's training is not counted",
    }


def job_kind(data: dict[str, Any]) -> str:
    """Which job a config file is for, from its top-level keys."""
    if "teacher" in data or "upsampler" in data:
        return "featsharp"
    if "students" in data or "out" in data:
        return "distill"
    if "teachers" in data or "source" in data or "pipeline" in data:
        return "cache"
    raise PlanError(
        "cannot tell the job from the config's keys (a caching job has teachers/source/pipeline, a distill job "
        "students/out, a FeatSharp job teacher/upsampler); give --job cache|distill|featsharp"
    )
