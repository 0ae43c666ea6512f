"""FeatSharp: train a learned upsampler for a low-resolution teacher, and use it when caching.

SigLIP2 sees 384 px; C-RADIOv4's high partition needs its features at 1152 px (72x72 tokens). Running it at
1152 px gives degraded features; bilinear upsampling of its 24x24 map gives blurred ones. FeatSharp runs the
frozen teacher on the low-res view plus the u x u tiles of the u-times larger image (1 + u^2 forwards), and a
small learned module (``radio_dist.upsampler``) fuses them into a u-times finer map. It is trained by
multi-view consistency: warp the fine map by a jitter, downsample it, and it must reproduce the teacher's
own low-res output of the jittered image; what is consistent across views survives, what flickers does not.
Everything happens in PHI-S space, fitted here on the teacher's low-res features.

- ``radio-dist featsharp train --config FILE`` (``run_featsharp``): a Ray Train job (``TorchTrainer``; each
  worker holds its share of the training photos, gradients all-reduced), checkpoints every
  ``train.checkpoint_every`` steps, resumable (a relaunch continues from the last checkpoint and ends with
  the same weights as an uninterrupted run). Writes ``OUT/featsharp.safetensors`` (the upsampler, its PHI-S,
  the teacher spec and fingerprint) and ``OUT/report.json``: on held-out photos, the consistency error of
  FeatSharp next to bilinear upsampling.
- A teacher spec with ``adaptation: featsharp`` and ``options.featsharp: PATH`` caches the high partition
  through it (``FeatSharpTeacher``); the file's checksum is part of the teacher's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from radio_dist.config import ConfigError, StrictModel
from radio_dist.distill import (
    DebugSettings,
    RunDir,
    RunLog,
    ScalingSettings,
    _all_reduce_grads,
    _broadcast_params,
    fit_with_ray_train,
    read_metrics,
)
from radio_dist.phis import Moments, PhiS, fit_phis
from radio_dist.pipeline import RayConfig, _init_ray
from radio_dist.sources import (
    ImageError,
    SourceConfig,
    SourceItem,
    canonical_view,
    decode_image,
    list_items,
    read_bytes,
)
from radio_dist.teacher import (
    FEATSHARP_OPTION,
    Adaptation,
    Teacher,
    TeacherSpec,
    create_teacher,
    fingerprint,
)
from radio_dist.upsampler import (
    FeatSharp,
    UpsamplerConfig,
    assemble_tiles,
    bilinear_prediction,
    consistency_loss,
    identity_jitters,
    jitter_views,
    masked_mse,
    sample_jitters,
    split_tiles,
)

FORMAT = "radio-dist-featsharp/1"


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
            from radio_dist.teacher import preset_spec

            try:
                return preset_spec(v).model_dump(mode="json")
            except (KeyError, ValueError) as e:
                raise ValueError(f"teacher {v!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> FeatSharpConfig:
        if self.teacher.adaptation != Adaptation.none:
            raise ValueError(
                f"featsharp trains for the teacher as it is: teacher {self.teacher.name!r} has adaptation "
                f"{self.teacher.adaptation.value!r}; set teacher.adaptation: none"
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


# -- data ------------------------------------------------------------------------------------------------------


def photo_of(item: SourceItem) -> str:
    """The source photo an item is a view of (sample-photo views share the photo's uri before '#')."""
    return item.uri.split("#view=", 1)[0]


def split_held_out(items: list[SourceItem], held_out: int) -> tuple[list[SourceItem], list[SourceItem]]:
    """(train, held-out): the held-out set is every view of ``held_out`` whole photos, chosen by a hash of
    their uri (stable across runs and machines), so no view of a held-out photo is ever trained on."""
    photos = sorted({photo_of(it) for it in items}, key=lambda u: hashlib.sha256(u.encode()).hexdigest())
    if len(photos) <= held_out:
        raise ConfigError(
            f"featsharp: the source has {len(photos)} photo(s); holding out {held_out} leaves none to train on — "
            "add photos or lower held_out"
        )
    out = set(photos[:held_out])
    return [it for it in items if photo_of(it) not in out], [it for it in items if photo_of(it) in out]


def load_views(items: list[SourceItem], size: int, source: SourceConfig) -> tuple[np.ndarray, list[str]]:
    """Decode items into uint8 ``[N, size, size, 3]`` canonical views; bad inputs are skipped and named."""
    views, bad = [], []
    for it in items:
        try:
            data = read_bytes(it.uri, source.storage_options)
            img = decode_image(data, it.uri, source.min_side, source.max_pixels)
            views.append(canonical_view(img.image, size, it.view, source.resample)[0])
        except (ImageError, OSError, ValueError) as e:
            bad.append(f"{it.uri}: {e}")
    if not views:
        raise ConfigError(f"featsharp: no decodable image in the source ({len(bad)} bad, e.g. {bad[:1]})")
    return np.stack(views), bad


# -- teacher views ---------------------------------------------------------------------------------------------


def teacher_dense(teacher: Teacher, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Dense features of normalized inputs, ``runtime.batch_size`` at a time."""
    outs = [teacher.features(x[i : i + chunk]).dense for i in range(0, x.shape[0], chunk)]
    return torch.cat(outs)


@dataclass
class Views:
    low: torch.Tensor  # [B, g, g, C] PHI-S space, the un-jittered low-res view
    tiles: torch.Tensor  # [B, u*g, u*g, C] PHI-S space
    targets: torch.Tensor  # [B, J, g, g, C] PHI-S space: teacher outputs of the jittered views
    theta: torch.Tensor  # [B, J, 2, 3]


def make_views(
    teacher: Teacher, phis: PhiS, x: torch.Tensor, factor: int, low_px: int, theta: torch.Tensor
) -> Views:
    """One batched teacher pass over the low view, the u x u tiles and the jittered views of ``x``."""
    b = x.shape[0]
    low_in = F.interpolate(x, size=(low_px, low_px), mode="bilinear", align_corners=False, antialias=True)
    parts = [low_in, split_tiles(x, factor), jitter_views(x, theta, low_px)]
    dense = phis.forward(teacher_dense(teacher, torch.cat(parts), teacher.spec.runtime.batch_size))
    assert isinstance(dense, torch.Tensor)
    g = dense.shape[1]
    low, rest = dense[:b], dense[b:]
    tiles = assemble_tiles(rest[: b * factor * factor], factor)
    targets = rest[b * factor * factor :].reshape(b, theta.shape[1], g, g, -1)
    return Views(low, tiles, targets, theta)


def with_identity(theta: torch.Tensor, views: Views) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend the un-jittered view (target: the low-res output itself) to the jitters."""
    b = theta.shape[0]
    return (
        torch.cat([identity_jitters(b, 1).to(theta), theta], dim=1),
        torch.cat([views.low[:, None], views.targets], dim=1),
    )


def fit_teacher_phis(teacher: Teacher, images: np.ndarray, low_px: int, seed: int = 0) -> PhiS:
    """PHI-S of the teacher's low-res dense features over ``images`` (the same on every worker)."""
    m: Moments | None = None
    chunk = teacher.spec.runtime.batch_size
    for i in range(0, len(images), chunk):
        dense = teacher(images[i : i + chunk], resolution=low_px).dense
        part = Moments.from_features(dense)
        m = part if m is None else m.merge(part)
    assert m is not None
    return fit_phis(m, seed=seed)


# -- export / load ---------------------------------------------------------------------------------------------


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


def _read_bytes(path: str) -> bytes:
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
    return hashlib.sha256(_read_bytes(path)).hexdigest()


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

    data = _read_bytes(path)
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


# -- held-out report -------------------------------------------------------------------------------------------


@torch.no_grad()
def consistency_report(
    teacher: Teacher,
    fs: LoadedFeatSharp,
    images: np.ndarray,
    jitters: int,
    seed: int,
    zoom: tuple[float, float] = (0.95, 1.05),
    max_rotation_deg: float = 5.0,
    max_shift: float = 0.05,
) -> dict[str, Any]:
    """On ``images`` (uint8, high-res): how well the teacher's low-res outputs of jittered views are
    reconstructed by FeatSharp's map vs by bilinear upsampling of the low-res map (PHI-S space, cells inside
    the image after the warp). Lower MSE / higher cosine is better; the jitters are fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    sums = {"featsharp_mse": 0.0, "bilinear_mse": 0.0, "featsharp_cos": 0.0, "bilinear_cos": 0.0}
    n = 0
    for i in range(len(images)):
        x = teacher.normalize(images[i : i + 1])
        theta = sample_jitters(jitters, gen, zoom, max_rotation_deg, max_shift).view(1, jitters, 2, 3).to(x)
        v = make_views(teacher, fs.phis, x, fs.factor, fs.low_px, theta)
        hr = fs.model(x, v.low, v.tiles)
        pred, valid = fs.model.predict_lowres(hr, theta)
        base = bilinear_prediction(v.low, theta)
        for name, p in (("featsharp", pred), ("bilinear", base)):
            sums[f"{name}_mse"] += float(masked_mse(p, v.targets, valid))
            cos = F.cosine_similarity(p.double(), v.targets.double(), dim=-1)
            sums[f"{name}_cos"] += float(cos[valid].mean())
        n += 1
    res: dict[str, Any] = {k: s / max(1, n) for k, s in sums.items()}
    res.update(images=n, jitters=jitters, seed=seed)
    res["featsharp_beats_bilinear"] = bool(res["featsharp_mse"] < res["bilinear_mse"])
    return res


def evaluate_file(
    path: str,
    source: SourceConfig | None = None,
    images: int = 16,
    jitters: int = 8,
    seed: int = 1,
    held_out_only: bool = True,
) -> dict[str, Any]:
    """``radio-dist featsharp eval``: the consistency report of a FeatSharp file on views of the photos it
    held out of training (``held_out_only``), from ``source`` (default: the sample photos, 96 views)."""
    fs = load_featsharp(path)
    spec = TeacherSpec.model_validate(fs.meta["teacher"])
    source = source or SourceConfig(views=96)
    items = list_items(source)
    if held_out_only:
        held = set(fs.meta.get("held_out_photos") or [])
        items = [it for it in items if photo_of(it) in held]
        if not items:
            raise ConfigError(
                f"{path} held out {sorted(held)}, none of which is in this source; pass the training source, "
                "or evaluate on any photos (held_out_only=False / --any-photos)"
            )
    imgs, _ = load_views(items[:images], fs.low_px * fs.factor, source)
    teacher = create_teacher(spec)
    res = consistency_report(teacher, fs, imgs, jitters, seed)
    res.update(teacher=spec.name, low=fs.low_px, high=fs.low_px * fs.factor, steps=fs.meta.get("steps"))
    return res


# -- the Ray Train loop ----------------------------------------------------------------------------------------


def _state_dict(model: FeatSharp, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "opt": opt.state_dict(), "step": step}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: every worker trains on its share of the photos; gradients are averaged."""
    import ray.train
    import torch.distributed as dist

    cfg = FeatSharpConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    device = (
        torch.device("cuda") if cfg.scaling.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    )
    torch.set_num_threads(cfg.train.threads or max(1, int(cfg.scaling.cpus_per_worker)))
    out = RunDir(cfg.out, cfg.out_storage_options)
    teacher = create_teacher(cfg.teacher, device)
    train_items, held_items = split_held_out(list_items(cfg.source), cfg.held_out)
    fit_imgs, _ = load_views(train_items[: cfg.phis_images], cfg.high_px, cfg.source)
    ckpt = ray.train.get_checkpoint()
    phis: PhiS
    if ckpt is not None:
        with ckpt.as_directory() as d:
            phis = PhiS.load(str(Path(d) / "phis.safetensors"))
    else:
        phis = fit_teacher_phis(teacher, fit_imgs, cfg.low_px, seed=cfg.train.seed)
    mine, bad = load_views(train_items[rank::world], cfg.high_px, cfg.source)
    probe = phis.forward(teacher(fit_imgs[:1], resolution=cfg.low_px).dense)
    assert isinstance(probe, torch.Tensor)
    ucfg = UpsamplerConfig(dim=probe.shape[-1], grid=probe.shape[1], **cfg.upsampler.model_dump())
    torch.manual_seed(cfg.train.seed)
    model = FeatSharp(ucfg).to(device)
    opt = torch.optim.NAdam(model.parameters(), lr=cfg.train.lr)
    step = 0
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
    elif distributed:
        _broadcast_params(model)
    meta = {
        "format": FORMAT,
        "teacher": cfg.teacher.model_dump(mode="json"),
        "teacher_fingerprint": fingerprint(cfg.teacher),
        "teacher_model_key": teacher_model_key(cfg.teacher),
        "low": cfg.low_px,
        "factor": cfg.upsampler.factor,
        "upsampler": ucfg.model_dump(mode="json"),
        "held_out_photos": sorted({photo_of(it) for it in held_items}),
        "train_images": len(train_items),
    }
    metrics_log = RunLog(out, "metrics.jsonl") if rank == 0 else None
    if rank == 0 and bad:
        print(f"featsharp: {len(bad)} source item(s) skipped, e.g. {bad[0]}")

    def checkpoint(metrics: dict[str, Any]) -> None:
        if metrics_log is not None:
            metrics_log.sync()
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(_state_dict(model, opt, step), Path(d) / "state.pt")
            phis.save(str(Path(d) / "phis.safetensors"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    model.train()
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.train.seed & 0xFFFFFFFF, step, rank, 0xF5])
        pick = rng.choice(len(mine), size=min(cfg.train.batch_size, len(mine)), replace=False)
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
        b = len(pick)
        theta = sample_jitters(
            b * cfg.train.jitters, gen, cfg.train.zoom, cfg.train.max_rotation_deg, cfg.train.max_shift
        ).view(b, cfg.train.jitters, 2, 3)
        with torch.no_grad():
            x = teacher.normalize(mine[np.sort(pick)])
            v = make_views(teacher, phis, x, cfg.upsampler.factor, cfg.low_px, theta.to(device))
            theta_all, targets = with_identity(v.theta, v)
        opt.zero_grad(set_to_none=False)
        hr = model(x, v.low, v.tiles)
        loss = consistency_loss(model, hr, theta_all, targets)
        loss.backward()
        lv = torch.tensor([float(loss.detach())], dtype=torch.float64)
        if distributed:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(world)
            _all_reduce_grads(model)
            dist.all_reduce(lv)
            lv /= world
        opt.step()
        step += 1
        line = {
            "step": step,
            "total_steps": cfg.train.steps,
            "loss": float(lv.item()),
            "step_s": time.perf_counter() - t0,
            "images": b * world,
        }
        if metrics_log is not None and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
            metrics_log.write(line)
        if cfg.debug.kill_at_step is not None and step == cfg.debug.kill_at_step + 1:
            marker = f"killed-{cfg.debug.kill_at_step}"
            if rank == cfg.debug.kill_rank and not out.exists(marker):
                out.touch(marker)
                os.kill(os.getpid(), signal.SIGKILL)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            checkpoint(line)
        if cfg.debug.stop_after_step is not None and step == cfg.debug.stop_after_step + 1:
            marker = f"stopped-{cfg.debug.stop_after_step}-rank{rank}"
            if not out.exists(marker):
                out.touch(marker)
                raise RuntimeError(f"debug.stop_after_step: stopping after step {step - 1}")

    if metrics_log is not None:
        metrics_log.close()
    if rank != 0:
        return
    model.eval()
    meta["steps"] = step
    with out.open("featsharp.safetensors", "wb") as f:
        f.write(featsharp_bytes(model.cpu(), phis, meta))
    model.to(device)
    held, _ = load_views(held_items, cfg.high_px, cfg.source)
    fs = LoadedFeatSharp(model, phis, meta)
    report = consistency_report(
        teacher,
        fs,
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
    upd: dict[str, Any] = {}
    if "://" not in cfg.out:
        upd["out"] = str(Path(cfg.out).resolve())
    if cfg.source.path and "://" not in cfg.source.path:
        upd["source"] = cfg.source.model_copy(update={"path": str(Path(cfg.source.path).resolve())})
    w = cfg.teacher.weights
    if w.path and w.kind.value == "file" and "://" not in w.path:
        upd["teacher"] = cfg.teacher.model_copy(
            update={"weights": w.model_copy(update={"path": str(Path(w.path).expanduser().resolve())})}
        )
    return cfg.model_copy(update=upd)


def run_featsharp(
    cfg: FeatSharpConfig, on_metrics: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train (or resume) FeatSharp with Ray Train; returns the summary with the held-out report."""
    cfg = _absolute(cfg)
    fingerprint(cfg.teacher)  # a missing weights file fails here, with its name, before Ray starts
    split_held_out(list_items(cfg.source), cfg.held_out)  # and so does a source too small to hold out
    _init_ray(cfg.ray)
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


# -- the caching adaptation ------------------------------------------------------------------------------------


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
            return self.inner._features(x)
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
            s, d = self.inner._features(stacked[i : i + chunk])
            denses.append(d.float())
            if s is not None:
                summaries.append(s.float())
        self.model_inputs += stacked.shape[0]
        dense = torch.cat(denses)
        y = self.fs.phis.forward(dense)
        assert isinstance(y, torch.Tensor)
        hr = self.upsampler(x.float(), y[:b], assemble_tiles(y[b:], u))
        summary = torch.cat(summaries)[:b] if summaries else None
        back = self.fs.phis.inverse(hr)
        assert isinstance(back, torch.Tensor)
        return summary, back


def build_featsharp_teacher(spec: TeacherSpec, build_inner: Callable[[TeacherSpec], Teacher]) -> Teacher:
    """``adaptation: featsharp``: the family's teacher (adaptation none) wrapped with the upsampler named by
    ``options.featsharp``; refused if the file was trained for another teacher model."""
    path = str(spec.options.get(FEATSHARP_OPTION))
    inner_spec = spec.model_copy(
        update={
            "adaptation": Adaptation.none,
            "options": {k: v for k, v in spec.options.items() if k != FEATSHARP_OPTION},
        }
    )
    fs = load_featsharp(path)
    if fs.meta.get("teacher_model_key") != teacher_model_key(inner_spec):
        raise ValueError(
            f"teacher {spec.name!r}: FeatSharp file {path} was trained for teacher {fs.meta['teacher'].get('name')!r} "
            f"({fs.meta['teacher'].get('family')} {fs.meta['teacher'].get('arch')}), whose architecture, weights, "
            "normalization or options differ from this spec's; train one for this teacher "
            "(`radio-dist featsharp train`) or fix the spec"
        )
    return FeatSharpTeacher(spec, build_inner(inner_spec), fs)
