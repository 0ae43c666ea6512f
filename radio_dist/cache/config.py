"""A `cache-teachers` job's config: source, teachers, store, views and batching, PHI-S fit, Ray."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from radio_dist.config import StrictModel
from radio_dist.ray_setup import RayConfig
from radio_dist.sources import SourceConfig
from radio_dist.store import StoreConfig
from radio_dist.store.codecs import UnknownCodecError, get_codec
from radio_dist.store.views import get_view_codec
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
    view_codec: str = Field(
        "raw",
        description="How canonical views are stored: raw (uint8 pixels), png (lossless), jpeg-Q or webp-Q "
        "(quality Q, e.g. jpeg-90). Teachers see the decoded pixels, the same ones students decode later.",
    )

    @field_validator("view_codec")
    @classmethod
    def _view_codec_ok(cls, v: str) -> str:
        return get_view_codec(v).name

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
    codecs: dict[str, str | dict[str, str]] = Field(
        default_factory=lambda: dict[str, str | dict[str, str]](default="fp16"),
        description="How dense targets are stored: `default` for every teacher, then per teacher a codec or "
        "{partition: codec}; codecs fp16 | int8 (per-token scale) | nf4 (4-bit, a scale per 64 channels; "
        "nf4-g32 / nf4-g128 for other groups). E.g. {default: int8, dinov3: {high: nf4}}.",
    )

    @model_validator(mode="after")
    def _codecs_ok(self) -> CacheJobConfig:
        names = {t.name for t in self.teachers}
        for key, choice in self.codecs.items():
            if key != "default" and key not in names:
                raise ValueError(
                    f"codecs: {key!r} is not a teacher of this job (teachers: {sorted(names)}; or default)"
                )
            if key == "default" and not isinstance(choice, str):
                raise ValueError("codecs.default must be one codec name (e.g. fp16), not a mapping")
            per_part = {"*": choice} if isinstance(choice, str) else choice
            for part, name in per_part.items():
                if part != "*" and part not in self.pipeline.partitions:
                    raise ValueError(
                        f"codecs.{key}: partition {part!r} is not one of the job's ({sorted(self.pipeline.partitions)})"
                    )
                try:
                    get_codec(name)
                except UnknownCodecError as e:
                    raise ValueError(f"codecs.{key}: {e}") from None
        return self

    def codec_name(self, teacher: str, partition: str) -> str:
        """The codec a teacher's dense targets at ``partition`` are stored with."""
        choice = self.codecs.get(teacher)
        if isinstance(choice, dict) and partition in choice:
            return choice[partition]
        if isinstance(choice, str):
            return choice
        default = self.codecs.get("default", "fp16")
        return default if isinstance(default, str) else "fp16"

    @field_validator("teachers")
    @classmethod
    def _unique(cls, v: list[TeacherSpec]) -> list[TeacherSpec]:
        names = [t.name for t in v]
        if not v or len(set(names)) != len(names):
            raise ValueError(f"teachers must be a non-empty list with unique names, got {names}")
        return v
