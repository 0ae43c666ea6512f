"""A `distill` job's config: the store, the students, the optimisation and the method's switches."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import Field, field_validator, model_validator

from radio_dist.config import StrictModel
from radio_dist.ray_setup import RayConfig
from radio_dist.store import StoreConfig
from radio_dist.teacher import TeacherSpec
from radio_dist.train.parallel import Precision
from radio_dist.train.reader import ReaderConfig
from radio_dist.train.students import StudentSpec
from radio_dist.train.worker import DebugSettings, ScalingSettings


class ExpectedTeacher(StrictModel):
    fingerprint: str | None = Field(None, description="Teacher fingerprint the job was configured for.")
    phis_sha256: str | None = Field(None, description="sha256 of the teacher's PHI-S parameter file.")


class ViewsPerEpoch(str, Enum):
    all = "all"
    one = "one"


class SummaryLoss(str, Enum):
    balanced = "balanced"  # Θ²/Disp: each teacher's summary loss in units of its angular spread (C-RADIOv4)
    angular = "angular"  # Θ²: every teacher alike, whatever its spread (the baseline it replaced)


class TrainConfig(StrictModel):
    """The optimisation and the method's switches (each ingredient can be turned off)."""

    epochs: int = Field(2, ge=1, description="Passes over the store.")
    batch_size: int = Field(16, ge=1, description="Images per worker per step.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps in total (benchmarks).")
    views: ViewsPerEpoch = Field(
        ViewsPerEpoch.all,
        description="all: every cached row once per epoch; one: one view per image per epoch, drawn from the "
        "seed and epoch, for stores that cache several views of each image (source.augment.views)",
    )
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (every student).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps, then cosine decay to 0.")
    resolutions: dict[str, list[int]] | None = Field(
        None,
        description="Stochastic resolution: partition -> student resolutions (px) sampled per step. "
        "Default: each trained partition at its cached size only.",
    )
    partition_weights: dict[str, float] | None = Field(
        None, description="Probability weight of each partition per step (default equal)."
    )
    max_shift: int = Field(
        1, ge=0, description="Shift equivariance: max student shift in whole patches (0 = off)."
    )
    spatial_weight: float = Field(1.0, ge=0, description="Weight of the PHI-S-space dense loss.")
    summary_weight: float = Field(1.0, ge=0, description="Weight of the summary loss.")
    summary_loss: SummaryLoss = Field(
        SummaryLoss.balanced,
        description="balanced: Θ²/Disp per teacher (C-RADIOv4); angular: plain Θ² (`radio-dist experiment "
        "summary-loss` compares them)",
    )
    mesa_weight: float = Field(
        0.1, ge=0, description="Weight of shift-equivariant MESA (0 = off, no EMA model)."
    )
    ema_momentum: float = Field(0.99, ge=0, le=1, description="EMA student momentum (for MESA).")
    damp_sigma: float = Field(
        0.05, ge=0, description="DAMP multiplicative weight-noise std at step 0 (0 = off)."
    )
    damp_schedule: str = Field("cosine", description="DAMP annealing: constant | linear | cosine.")
    checkpoint_every: int = Field(50, ge=0, description="Checkpoint every N steps (0: at epoch ends only).")
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps.")
    precision: Precision = Field(
        "auto",
        description="auto: bf16 autocast on CUDA, fp32 elsewhere; bf16 | fp32 force it (master weights and "
        "optimizer state stay fp32).",
    )
    grad_clip: float | None = Field(
        1.0,
        gt=0,
        description="Clip each student's gradient norm to this (None: no clipping; the norm is logged).",
    )
    max_nonfinite_steps: int = Field(
        10,
        ge=1,
        description="A step whose loss or gradient is not finite is skipped; this many in a row stop the job.",
    )
    seed: int = Field(0, description="Seeds the data order, resolutions, shifts and initial weights.")
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default: its CPUs).")
    export_ema: bool = Field(False, description="Export the EMA students instead of the trained ones.")

    @field_validator("damp_schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        if v not in {"constant", "linear", "cosine"}:
            raise ValueError(f"damp_schedule must be constant, linear or cosine, got {v!r}")
        return v


def default_students() -> list[StudentSpec]:
    """The built-in family: a small C-RADIO student plus two smaller timm students (CPU-sized)."""
    return [
        StudentSpec(
            name="cradio",
            kind="cradio",
            arch="tiny",
            overrides={"embed_dim": 192, "depth": 4, "num_heads": 3},
            head_hidden=256,
        ),
        StudentSpec(
            name="vit_tiny",
            kind="timm",
            arch="vit_tiny_patch16_224",
            overrides={"depth": 4},
            head_hidden=256,
        ),
        StudentSpec(name="convnext_atto", kind="timm", arch="convnext_atto", head_hidden=256),
    ]


class DistillConfig(StrictModel):
    """A `distill` job: store in, students out. The same file runs on a laptop and on a cluster."""

    store: StoreConfig = Field(description="The feature store to train from.")
    out: str = Field(description="Run directory (local path or fsspec URL): checkpoints, metrics, exports.")
    out_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for `out` (S3 endpoint, credentials, ...)."
    )
    name: str = Field("distill", description="Run name (Ray Train run under OUT/ray).")
    students: list[StudentSpec] = Field(
        default_factory=default_students, description="Students trained together on every batch."
    )
    teachers: list[str] | None = Field(
        None,
        description="Cached teachers to distill (default: every teacher of the store not run live; [] = none).",
    )
    live_teachers: list[TeacherSpec | str] = Field(
        default_factory=list,
        description="Teachers run live in the training workers on every batch, beside the cached ones: a "
        "teacher spec, or the name of a store teacher (its recorded spec; all of them live = the online "
        "baseline). PHI-S is fitted on first use and saved under OUT/live.",
    )
    live_fit_images: int = Field(
        256, ge=2, description="Images (first by id) a live teacher's PHI-S is fitted on."
    )
    partitions: list[str] | None = Field(None, description="Cached partitions to train on (default: all).")
    expect: dict[str, ExpectedTeacher] = Field(
        default_factory=dict, description="Refuse a store whose teachers do not match these."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and method switches.")
    reader: ReaderConfig = Field(default_factory=ReaderConfig, description="Store reading.")
    scaling: ScalingSettings = Field(default_factory=ScalingSettings, description="Ray Train workers.")
    ray: RayConfig = Field(
        # Ray Train's placement-group monitor polls the state API, which a dashboard-less local instance lacks,
        # and would flood the terminal; worker logs stay in Ray's session logs and errors reach the driver.
        default_factory=lambda: RayConfig(log_to_driver=False),
        description="Ray cluster connection.",
    )
    debug: DebugSettings = Field(default_factory=DebugSettings, description="Fault injection (tests).")

    @model_validator(mode="after")
    def _unique_students(self) -> DistillConfig:
        names = [s.name for s in self.students]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"students must be a non-empty list with unique names, got {names}")
        return self
