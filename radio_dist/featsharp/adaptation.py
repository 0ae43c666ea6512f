"""FeatSharp as an adaptation of any teacher family, used when caching (``adaptation: featsharp``).

A spec with ``adaptation: featsharp`` and ``options.featsharp: PATH`` caches its high partition through the
upsampler in PATH (a file of ``radio-dist featsharp train``): ``FeatSharpTeacher`` wraps the family's own
teacher. Importing this module registers the adaptation; it imports the model and the file format only, not
the training job.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from radio_dist.featsharp.file import (
    FEATSHARP_OPTION,
    LoadedFeatSharp,
    featsharp_checksum,
    load_featsharp,
    teacher_model_key,
)
from radio_dist.featsharp.model import assemble_tiles, split_tiles
from radio_dist.teacher import Teacher, TeacherFactory, TeacherSpec, register_adaptation

FEATSHARP = "featsharp"


class FeatSharpTeacher(Teacher):
    """A teacher whose inputs of ``factor x low`` px go through FeatSharp; ``low`` px inputs run as they are.

    The high-res path: the teacher on the low view and the u x u tiles (1 + u^2 model inputs per image, in
    chunks of ``runtime.batch_size``), FeatSharp in its PHI-S space, back to teacher space (the store applies
    its own PHI-S). The summary is the teacher's summary of the low view.
    """

    def __init__(self, spec: TeacherSpec, inner: Teacher, fs: LoadedFeatSharp) -> None:
        super().__init__(spec)
        self.inner = inner
        self.upsampler = fs.model  # a submodule, so .to(device) moves it with the teacher
        self.fs = fs

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        size = x.shape[-1]
        low, high = self.fs.low_px, self.fs.low_px * self.fs.factor
        if size == low:
            out = self.inner.features(x)
            return out.summary, out.dense
        if size != high or x.shape[-2] != high:
            raise ValueError(
                f"teacher {self.spec.name}: FeatSharp runs at {high} px (= {self.fs.factor} x {low}) and the "
                f"teacher alone at {low} px; got {x.shape[-2]}x{size} — set the spec's resolution for this "
                f"partition to {high} or {low}"
            )
        b, u = x.shape[0], self.fs.factor
        low_in = F.interpolate(x, size=(low, low), mode="bilinear", align_corners=False, antialias=True)
        stacked = torch.cat([low_in, split_tiles(x, u)])
        chunk = self.spec.runtime.batch_size
        summaries, denses = [], []
        for i in range(0, stacked.shape[0], chunk):
            out = self.inner.features(stacked[i : i + chunk])
            denses.append(out.dense)
            if out.summary is not None:
                summaries.append(out.summary)
        self.model_inputs += stacked.shape[0]
        dense = torch.cat(denses)
        y = self.fs.phis.forward(dense)
        assert isinstance(y, torch.Tensor)
        hr = self.upsampler(x.float(), y[:b], assemble_tiles(y[b:], u))
        summary = torch.cat(summaries)[:b] if summaries else None
        back = self.fs.phis.inverse(hr)
        assert isinstance(back, torch.Tensor)
        return summary, back


def build_featsharp_teacher(spec: TeacherSpec, build_inner: TeacherFactory) -> Teacher:
    """``adaptation: featsharp``: the family's teacher (adaptation none) wrapped with the upsampler named by
    ``options.featsharp``; refused if the file was trained for another teacher model."""
    path = str(spec.options.get(FEATSHARP_OPTION))
    inner_spec = spec.without_adaptation()
    fs = load_featsharp(path)
    if fs.meta.get("teacher_model_key") != teacher_model_key(inner_spec):
        raise ValueError(
            f"teacher {spec.name!r}: FeatSharp file {path} was trained for teacher {fs.meta['teacher'].get('name')!r} "
            f"({fs.meta['teacher'].get('family')} {fs.meta['teacher'].get('arch')}), whose architecture, weights, "
            "normalization or options differ from this spec's; train one for this teacher "
            "(`radio-dist featsharp train`) or fix the spec"
        )
    return FeatSharpTeacher(spec, build_inner(inner_spec), fs)


def check_featsharp_spec(spec: TeacherSpec) -> None:
    """``adaptation: featsharp`` needs ``options.featsharp``, the path of a FeatSharp file."""
    path = spec.options.get(FEATSHARP_OPTION)
    if not isinstance(path, str) or not path:
        raise ValueError(
            f"teacher {spec.name!r}: adaptation=featsharp needs options.{FEATSHARP_OPTION}, the path of a "
            "FeatSharp file (OUT/featsharp.safetensors of `radio-dist featsharp train`)"
        )


def featsharp_identity(spec: TeacherSpec) -> dict[str, Any]:
    """The spec's options as its fingerprint hashes them: the upsampler's weights change the targets, so the
    file's content counts, not where it lies."""
    options = dict(spec.model_dump(mode="json")["options"])
    options[FEATSHARP_OPTION] = f"sha256:{featsharp_checksum(str(spec.options[FEATSHARP_OPTION]))}"
    return options


register_adaptation(
    FEATSHARP,
    description="the high partition through a learned FeatSharp upsampler of the low-res teacher "
    f"(options.{FEATSHARP_OPTION} = a file of `radio-dist featsharp train`); any family",
    options=(FEATSHARP_OPTION,),
    check=check_featsharp_spec,
    wrap=build_featsharp_teacher,
    identity=featsharp_identity,
)
