"""``store.json``, the store's metadata, as typed records: what the caching job writes and training reads.

One ``StoreMeta`` per store: the format, the partitions and their view size, how views were resampled, and a
``TeacherRecord`` per teacher (fingerprint and spec, then — once fitted — its PHI-S file, summary dispersion
and output shapes per partition). Unknown keys are refused, so a file from another version of the format is
an error that names the file, not a silent misread.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from radio_dist.config import StrictModel

FORMAT = "radio-dist-store/1"


class PhisRecord(StrictModel):
    """Where a teacher's PHI-S parameters lie and what they are."""

    file: str = Field(description="Path of the safetensors file, relative to the store root.")
    sha256: str = Field(description="Checksum of that file (training jobs can pin it: expect.T.phis_sha256).")
    rotation: str = Field(description="hadamard | orthogonal.")
    alpha: float = Field(description="PHI-S scale 1/sqrt(mean eigenvalue).")
    fit_images: int = Field(ge=0, description="Images the moments were accumulated over.")


class OutputShapes(StrictModel):
    """A teacher's stored output shapes at one partition (per image)."""

    dense: list[int] = Field(description="[h, w, C] of the dense target.")
    summary: list[int] | None = Field(None, description="[C] of the summary vector; None without a summary.")

    @property
    def summary_dim(self) -> int | None:
        return int(self.summary[-1]) if self.summary else None

    @property
    def dense_dim(self) -> int:
        return int(self.dense[-1])


class TeacherRecord(StrictModel):
    """One teacher of a store: what it is (fingerprint, spec) and, once fitted, its PHI-S and outputs."""

    fingerprint: str = Field(description="Hash of the teacher's spec identity and weights.")
    family: str = Field(description="Registered family that built it.")
    spec: dict[str, Any] = Field(description="The spec's identity (everything but runtime), as JSON.")
    phis: PhisRecord | None = Field(None, description="PHI-S parameters; None until the fit sample ran.")
    summary_dispersion: float | None = Field(None, description="Angular dispersion of the summaries.")
    outputs: dict[str, OutputShapes] = Field(default_factory=dict, description="Partition -> shapes.")
    codecs: dict[str, str] = Field(
        default_factory=dict,
        description="Partition -> codec of the stored dense targets (fp16 | int8 | nf4[-gG]); a partition not "
        "named (every partition of a store written before codecs existed) is fp16.",
    )

    def codec_name(self, partition: str) -> str:
        return self.codecs.get(partition, "fp16")


class StoreMeta(StrictModel):
    """The whole of ``store.json``."""

    format: str = Field(FORMAT, description="Store format and version.")
    created_at: float = Field(default_factory=time.time, description="Unix time of creation.")
    partitions: dict[str, int] = Field(description="Partition -> canonical view size (px).")
    view_resample: str = Field(
        "bicubic",
        description="How canonical views were resampled (source.resample); stores from before the setting "
        "existed used PIL's bicubic.",
    )
    view_codec: str = Field(
        "raw",
        description="How canonical views are stored (pipeline.view_codec): raw uint8 pixels, png, jpeg-Q or "
        "webp-Q; the teachers saw the decoded pixels.",
    )
    dense_dtype: str = Field(
        "float16",
        description="Kept for stores of earlier versions; the teachers' `codecs` say how targets are stored.",
    )
    teachers: dict[str, TeacherRecord] = Field(description="Teacher name -> record.")
