"""A `cache-teachers` job's config: source, teachers, store, views and batching, PHI-S fit, Ray."""

from __future__ import annotations

from pydantic import Field, field_validator

from radio_dist.config import StrictModel
from radio_dist.ray_setup import RayConfig
from radio_dist.sources import SourceConfig
from radio_dist.store import StoreConfig
from radio_dist.teacher import TeacherSpec, preset_spec

DEFAULT_TEACHERS = ("efficientnet_lite0", "mobilenet_v2")


class PipelineConfig(StrictModel):
    partitions: dict[str, int] = Field(
        default_factory=lambda: {"low": 224},
        description="Canonical square view size (px) per resolution partition, e.g. {low: 432, high: 1152}.",
    )
    decode_batch_size: int = Field(32, ge=1, description="Images per decode task batch.")
    id_batch_size: int = Field(64, ge=1, description="Inputs per content-hashing task batch.")
    decode_num_cpus: float = Field(0.5, gt=0, description="Ray CPUs per decode task.")
    decode_tasks: int = Field(2, ge=1, description="Most decode tasks in flight at once.")
    write_num_cpus: float = Field(0.25, gt=0, description="Ray CPUs per shard-write task.")

    @field_validator("partitions")
    @classmethod
    def _parts_ok(cls, v: dict[str, int]) -> dict[str, int]:
        if not v:
            raise ValueError("at least one partition is needed, e.g. {low: 224}")
        for name, size in v.items():
            if not name.isidentifier() or size < 16:
                raise ValueError(
                    f"partition {name!r}: name must be an identifier and size >= 16 px (got {size})"
                )
        return v


class PhisConfig(StrictModel):
    fit_images: int = Field(256, ge=2, description="Images in the PHI-S fit sample (first N by image id).")
    seed: int = Field(0, description="Seed of the orthogonal fallback rotation (no Hadamard order).")


class CacheJobConfig(StrictModel):
    """A `cache-teachers` job: the same file drives a laptop run and a cluster run."""

    source: SourceConfig = Field(default_factory=SourceConfig, description="Where the images come from.")
    teachers: list[TeacherSpec] = Field(
        default_factory=lambda: [preset_spec(n) for n in DEFAULT_TEACHERS],
        description="Teachers to cache (default: the two offline ImageNet teachers).",
    )
    store: StoreConfig = Field(description="Feature store root and shard layout.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Views and batching.")
    phis: PhisConfig = Field(default_factory=PhisConfig, description="PHI-S fitting.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster connection.")

    @field_validator("teachers")
    @classmethod
    def _unique(cls, v: list[TeacherSpec]) -> list[TeacherSpec]:
        names = [t.name for t in v]
        if not v or len(set(names)) != len(names):
            raise ValueError(f"teachers must be a non-empty list with unique names, got {names}")
        return v
