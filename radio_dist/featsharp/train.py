"""FeatSharp training: a resumable Ray Train job that teaches the upsampler multi-view consistency.

SigLIP2 sees 384 px; C-RADIOv4's high partition needs its features at 1152 px (72x72 tokens). Running it at
1152 px gives degraded features; bilinear upsampling of its 24x24 map gives blurred ones. FeatSharp runs the
frozen teacher on the low-res view plus the u x u tiles of the u-times larger image (1 + u^2 forwards), and a
small learned module (``radio_dist.featsharp.model``) fuses them into a u-times finer map. It is trained by
multi-view consistency: warp the fine map by a jitter, downsample it, and it must reproduce the teacher's
own low-res output of the jittered image; what is consistent across views survives, what flickers does not.
Everything happens in PHI-S space, fitted here on the teacher's low-res features.

``radio-dist featsharp train --config FILE`` (``run_featsharp``): a Ray Train job (``TorchTrainer``; each
worker holds its share of the training photos, gradients all-reduced), checkpoints every
``train.checkpoint_every`` steps, resumable (a relaunch continues from the last checkpoint and ends with the
same weights as an uninterrupted run). Writes ``OUT/featsharp.safetensors`` (``radio_dist.featsharp.file``)
and ``OUT/report.json``: on held-out photos, the consistency error of FeatSharp next to bilinear upsampling.
A teacher spec with ``adaptation: featsharp`` then caches through it (``radio_dist.featsharp.adaptation``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from radio_dist.config import StrictModel
from radio_dist.featsharp.file import FORMAT, LoadedFeatSharp, featsharp_bytes, teacher_model_key
from radio_dist.featsharp.model import FeatSharp, UpsamplerConfig, consistency_loss, sample_jitters
from radio_dist.featsharp.report import consistency_report
from radio_dist.featsharp.views import (
    fit_teacher_phis,
    load_views,
    make_views,
    split_held_out,
    with_identity,
)
from radio_dist.phis import PhiS
from radio_dist.ray_setup import RayConfig, init_ray
from radio_dist.sources import SourceConfig, SourceItem, list_items
from radio_dist.teacher import NO_ADAPTATION, Teacher, TeacherSpec, create_teacher, fingerprint, preset_spec
from radio_dist.train.driver import absolute_path, fit_with_ray_train
from radio_dist.train.parallel import data_parallel
from radio_dist.train.rundir import RunDir, read_metrics
from radio_dist.train.worker import DebugSettings, ScalingSettings, TrainWorker


class UpsamplerSettings(StrictModel):
    """The upsampler's shape; ``dim`` and ``grid`` come from the teacher."""

    factor: int = Field(3, ge=2, description="u: output grid = u x the teacher's grid (3: 384 -> 1152 px).")
    hidden: int = Field(0, ge=0, description="Fusion block width (0 = min(teacher dim, 512)).")
    heads: int = Field(4, ge=1, description="Attention heads of the fusion block.")
    window: int = Field(7, ge=1, description="Local attention window side (tokens).")
    down_kernel: int = Field(9, ge=1, description="Attention downsampler kernel side (HR tokens).")
    guidance_dim: int = Field(
        32, ge=1, description="Image-guidance channels of the joint bilateral upsampler."
    )
    jbu_radius: int = Field(
        1, ge=0, description="Joint bilateral upsampler neighbourhood radius (low-res cells)."
    )


class FeatSharpTrain(StrictModel):
    steps: int = Field(2000, ge=1, description="Optimizer steps (the public example trains ~9000).")
    batch_size: int = Field(4, ge=1, description="Images per step per worker.")
    jitters: int = Field(5, ge=1, description="Jittered views per image and step (plus the un-jittered one).")
    lr: float = Field(5e-4, gt=0, description="NAdam learning rate.")
    zoom: tuple[float, float] = Field((0.95, 1.05), description="Jitter zoom range.")
    max_rotation_deg: float = Field(5.0, ge=0, description="Jitter rotation bound (degrees).")
    max_shift: float = Field(0.05, ge=0, description="Jitter shift bound (fraction of the image side).")
    seed: int = Field(0, description="Seeds model init, image choice and jitters (all per step).")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (and at the end).")
    log_every: int = Field(10, ge=1, description="Steps between metrics lines.")
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default: its CPUs).")


class FeatSharpConfig(StrictModel):
    """A FeatSharp training job (``radio-dist featsharp train``)."""

    teacher: TeacherSpec = Field(
        description="The frozen low-resolution teacher (adaptation none): a spec, or a preset name "
        "(`radio-dist teachers list`)."
    )
    source: SourceConfig = Field(default_factory=SourceConfig, description="Training photos.")
    out: str = Field("./featsharp", description="Run directory (local path or s3://): checkpoints, export.")
    out_storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for out.")
    name: str = Field("featsharp", description="Ray Train run name.")
    low: int | None = Field(
        None,
        ge=8,
        description="The teacher's native input size in px (default: teacher.resolution['low']); the high-res "
        "input is factor x low.",
    )
    upsampler: UpsamplerSettings = Field(default_factory=UpsamplerSettings)
    held_out: int = Field(
        2, ge=1, description="Source photos (with all their views) kept out of training for the report."
    )
    report_jitters: int = Field(8, ge=1, description="Jittered views per held-out image in the report.")
    phis_images: int = Field(32, ge=2, description="Training images whose low-res features fit the PHI-S.")
    train: FeatSharpTrain = Field(default_factory=FeatSharpTrain)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    ray: RayConfig = Field(default_factory=lambda: RayConfig(log_to_driver=False))
    debug: DebugSettings = Field(default_factory=DebugSettings)

    @field_validator("teacher", mode="before")
    @classmethod
    def _preset(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return preset_spec(v).model_dump(mode="json")
            except (KeyError, ValueError) as e:
                raise ValueError(f"teacher {v!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> FeatSharpConfig:
        if self.teacher.adaptation != NO_ADAPTATION:
            raise ValueError(
                f"featsharp trains for the teacher as it is: teacher {self.teacher.name!r} has adaptation "
                f"{self.teacher.adaptation!r}; set teacher.adaptation: none"
            )
        up = self.upsampler
        if up.down_kernel < up.factor or (up.down_kernel - up.factor) % 2:
            raise ValueError(
                f"upsampler.down_kernel={up.down_kernel} must be >= factor={up.factor} with an even difference "
                f"(e.g. {up.factor + 6}); the downsampler is centred on each factor x factor cell"
            )
        if up.hidden and up.hidden % up.heads:
            raise ValueError(f"upsampler.heads={up.heads} must divide upsampler.hidden={up.hidden}")
        if self.low is None and "low" not in self.teacher.resolution:
            raise ValueError(
                "featsharp needs the teacher's native input size: set `low` (e.g. 384 for SigLIP2-g-384) or "
                "teacher.resolution.low"
            )
        return self

    @property
    def low_px(self) -> int:
        return int(self.low if self.low is not None else self.teacher.resolution["low"])

    @property
    def high_px(self) -> int:
        return self.low_px * self.upsampler.factor


# -- the Ray Train loop ----------------------------------------------------------------------------------------


def featsharp_step(
    model: FeatSharp,
    train_model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    teacher: Teacher,
    phis: PhiS,
    images: np.ndarray,
    cfg: FeatSharpConfig,
    rng: np.random.Generator,
    world: int,
    distributed: bool,
) -> float:
    """One optimizer step on ``images`` (uint8, high-res) and their jitters; the loss, averaged over workers.
    ``train_model`` is ``model`` or its DDP wrapper (which averages the gradients during the backward)."""
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
    b, t = len(images), cfg.train
    theta = sample_jitters(b * t.jitters, gen, t.zoom, t.max_rotation_deg, t.max_shift).view(
        b, t.jitters, 2, 3
    )
    with torch.no_grad():
        x = teacher.normalize(images)
        v = make_views(teacher, phis, x, cfg.upsampler.factor, cfg.low_px, theta.to(x.device))
        theta_all, targets = with_identity(v.theta, v)
    opt.zero_grad(set_to_none=True)
    hr = train_model(x, v.low, v.tiles)
    loss = consistency_loss(model, hr, theta_all, targets)
    loss.backward()
    lv = torch.tensor([float(loss.detach())], dtype=torch.float64)
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(lv)
        lv /= world
    opt.step()
    return float(lv.item())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: every worker trains on its share of the photos; gradients are averaged."""
    cfg = FeatSharpConfig.model_validate(config["cfg"])
    worker = TrainWorker.start(
        cfg.scaling, cfg.train.threads, RunDir(cfg.out, cfg.out_storage_options), cfg.debug
    )
    ctx = worker.ctx
    teacher = create_teacher(cfg.teacher, ctx.device)
    train_items, held_items = split_held_out(list_items(cfg.source), cfg.held_out)
    fit_imgs, _ = load_views(train_items[: cfg.phis_images], cfg.high_px, cfg.source)
    restored = worker.restore()
    if restored is not None:
        phis = PhiS.from_arrays({k: v.cpu().numpy() for k, v in restored.states["phis"].items()})
    else:
        phis = fit_teacher_phis(teacher, fit_imgs, cfg.low_px, seed=cfg.train.seed)
    mine, bad = load_views(train_items[ctx.rank :: ctx.world], cfg.high_px, cfg.source)
    probe = phis.forward(teacher(fit_imgs[:1], resolution=cfg.low_px).dense)
    assert isinstance(probe, torch.Tensor)
    ucfg = UpsamplerConfig(dim=probe.shape[-1], grid=probe.shape[1], **cfg.upsampler.model_dump())
    torch.manual_seed(cfg.train.seed)
    model = FeatSharp(ucfg).to(ctx.device)
    train_model = data_parallel(model, ctx.distributed, ctx.device)  # rank 0's initial weights everywhere
    opt = torch.optim.NAdam(model.parameters(), lr=cfg.train.lr)
    step = 0
    if restored is not None:
        model.load_state_dict(restored.states["model"])
        opt.load_state_dict(restored.states["opt"])
        step = int(restored.meta["step"])
    meta = {
        "format": FORMAT,
        "teacher": cfg.teacher.model_dump(mode="json"),
        "teacher_fingerprint": fingerprint(cfg.teacher),
        "teacher_model_key": teacher_model_key(cfg.teacher),
        "low": cfg.low_px,
        "factor": cfg.upsampler.factor,
        "upsampler": ucfg.model_dump(mode="json"),
        "held_out_photos": sorted({it.photo for it in held_items}),
        "train_images": len(train_items),
    }
    if ctx.rank == 0 and bad:
        print(f"featsharp: {len(bad)} source item(s) skipped, e.g. {bad[0]}")
    phis_state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in phis.to_arrays().items()}
    worker.open_tensorboard(purge_step=step + 1)

    model.train()
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.train.seed & 0xFFFFFFFF, step, ctx.rank, 0xF5])
        pick = rng.choice(len(mine), size=min(cfg.train.batch_size, len(mine)), replace=False)
        loss = featsharp_step(
            model, train_model, opt, teacher, phis, mine[np.sort(pick)], cfg, rng, ctx.world, ctx.distributed
        )
        step += 1
        line = {
            "step": step,
            "total_steps": cfg.train.steps,
            "loss": loss,
            "step_s": time.perf_counter() - t0,
            "images": len(pick) * ctx.world,
        }
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            worker.log(line)
        worker.after_step(step)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            states = {"model": model.state_dict(), "opt": opt.state_dict(), "phis": phis_state}
            worker.checkpoint(line, {"step": step}, states)
        worker.after_checkpoint(step)

    worker.close()
    if ctx.rank == 0:
        export_and_report(cfg, worker.out, model, teacher, phis, meta, step, held_items)


def export_and_report(
    cfg: FeatSharpConfig,
    out: RunDir,
    model: FeatSharp,
    teacher: Teacher,
    phis: PhiS,
    meta: dict[str, Any],
    steps: int,
    held_items: list[SourceItem],
) -> None:
    """``OUT/featsharp.safetensors``, then ``OUT/report.json``: the held-out photos' consistency report."""
    device = next(model.parameters()).device
    model.eval()
    meta = {**meta, "steps": steps}
    with out.open("featsharp.safetensors", "wb") as f:
        f.write(featsharp_bytes(model.cpu(), phis, meta))
    model.to(device)
    held, _ = load_views(held_items, cfg.high_px, cfg.source)
    report = consistency_report(
        teacher,
        LoadedFeatSharp(model, phis, meta),
        held,
        cfg.report_jitters,
        seed=cfg.train.seed + 1,
        zoom=cfg.train.zoom,
        max_rotation_deg=cfg.train.max_rotation_deg,
        max_shift=cfg.train.max_shift,
    )
    report["held_out_photos"] = meta["held_out_photos"]
    with out.open("report.json", "w") as f:
        f.write(json.dumps(report, indent=1))


# -- the driver ------------------------------------------------------------------------------------------------


def _absolute(cfg: FeatSharpConfig) -> FeatSharpConfig:
    """Ray Train workers run in their own directory: local paths must not be relative to ours."""
    upd: dict[str, Any] = {"out": absolute_path(cfg.out)}
    if cfg.source.path:
        upd["source"] = cfg.source.model_copy(update={"path": absolute_path(cfg.source.path)})
    w = cfg.teacher.weights
    if w.path and w.kind.value == "file":
        upd["teacher"] = cfg.teacher.model_copy(
            update={"weights": w.model_copy(update={"path": absolute_path(w.path)})}
        )
    return cfg.model_copy(update=upd)


def run_featsharp(
    cfg: FeatSharpConfig, on_metrics: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train (or resume) FeatSharp with Ray Train; returns the summary with the held-out report."""
    cfg = _absolute(cfg)
    fingerprint(cfg.teacher)  # a missing weights file fails here, with its name, before Ray starts
    split_held_out(list_items(cfg.source), cfg.held_out)  # and so does a source too small to hold out
    init_ray(cfg.ray)
    out = RunDir(cfg.out, cfg.out_storage_options)
    out.fs.makedirs(out.root, exist_ok=True)
    with out.open("featsharp-job.json", "w") as f:
        f.write(json.dumps(cfg.model_dump(mode="json"), indent=1))
    t0 = time.perf_counter()
    fit_with_ray_train(
        train_loop_per_worker,
        {"cfg": cfg.model_dump(mode="json")},
        out,
        cfg.name,
        cfg.scaling,
        on_metrics,
        step_key="step",
    )
    report = json.loads(bytes(out.fs.cat_file(out.path("report.json"))).decode())
    lines = read_metrics(out, step_key="step")
    return {
        "out": cfg.out,
        "teacher": cfg.teacher.name,
        "low": cfg.low_px,
        "high": cfg.high_px,
        "steps": lines[-1]["step"] if lines else 0,
        "final_loss": lines[-1]["loss"] if lines else None,
        "wall_s": time.perf_counter() - t0,
        "featsharp": f"{cfg.out.rstrip('/')}/featsharp.safetensors",
        "report": report,
    }
