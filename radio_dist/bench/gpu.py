"""`make bench-gpu` (``python -m radio_dist.bench.gpu``): the trainer's and the teachers' speed on one GPU.

Self-contained on purpose: it needs torch, timm and numpy only (no Ray, zarr or pydantic, nothing installed at
run time), so it runs on a bare GPU machine from a copy of the working tree. With random-init real-size
architectures it measures:

- **students**: one optimizer step (forward, backward, fused AdamW) of C-RADIO-B/L/H-sized students — timm
  ViT backbones of those widths and depths, patch 16, 3 summary + 4 register tokens, one MLP adaptor head pair
  per teacher of C-RADIOv4 (SigLIP2-g 1536-d, DINOv3-7B 4096-d, SAM3 1024-d) — at 224 and 512 px, in bf16
  autocast (fp32 master weights) and in fp32: step time, images/s, model FLOPs per step (counted by
  ``torch.utils.flop_counter``), MFU against the matmul rate measured first and against the datasheet's,
  and peak device memory;
- **teachers**: the forward pass of DINOv3-L and DINOv3-7B (timm's architectures, 512 px), SigLIP2-g
  (384 px) and a SAM3-sized encoder (1008 px, patch 14, windowed attention with 4 global blocks) in bf16:
  images/s, FLOPs per image, and the bytes/s of targets they produce (dense fp16 + summary fp32, what the
  store writes).

``--tiny`` runs the same code at toy sizes (the CPU test). Every configuration is timed after warm-up with
the device synchronized (median of ``--iters``); a configuration that fails (out of memory, an architecture the
installed timm lacks) is recorded with its error and the rest go on; a time budget skips what is left.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# C-RADIO student sizes (ViT width, depth, heads) and C-RADIOv4's teachers' feature widths
STUDENTS = {"B": (768, 12, 12), "L": (1024, 24, 16), "H": (1280, 32, 16)}
TEACHER_DIMS = {"siglip2_g": 1536, "dinov3_7b": 4096, "sam3": 1024}
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
PREFIX = 7  # 3 summary tokens (one per teacher) + 4 registers


class Student(nn.Module):
    """A C-RADIO-sized student: ViT backbone + (summary, dense) MLP heads per teacher."""

    def __init__(self, width: int, depth: int, heads: int, px: int, hidden: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.backbone = VisionTransformer(
            img_size=px,
            patch_size=16,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            num_classes=0,
            class_token=False,
            reg_tokens=PREFIX,
            global_pool="",
            dynamic_img_size=True,
        )
        self.summary = nn.ModuleList(_mlp(width, hidden, d) for d in TEACHER_DIMS.values())
        self.dense = nn.ModuleList(_mlp(width, hidden, d) for d in TEACHER_DIMS.values())

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tokens = self.backbone.forward_features(x)
        patches = tokens[:, PREFIX:]
        return [
            (s(tokens[:, i]), d(patches))
            for i, (s, d) in enumerate(zip(self.summary, self.dense, strict=True))
        ]


def _mlp(i: int, h: int, o: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(i), nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls, the device synchronized around each."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_tflops(device: torch.device, n: int, iters: int) -> float:
    """The bf16 matrix-product rate here (the MFU ceiling actually reachable), on random data."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = timed(lambda: a @ b, device, 3, iters)
    return 2 * n**3 / s / 1e12


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_student(
    size: tuple[int, int, int], px: int, batch: int, bf16: bool, device: torch.device, iters: int, hidden: int
) -> dict[str, Any]:
    _reset(device)
    torch.manual_seed(0)
    model = Student(*size, px=px, hidden=hidden).to(device)
    fused = device.type == "cuda"
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        if fused
        else torch.optim.AdamW(model.parameters(), lr=1e-4)
    )
    x = torch.rand(batch, 3, px, px, device=device)
    g = px // 16
    targets = [
        (torch.randn(batch, d, device=device), torch.randn(batch, g * g, d, device=device))
        for d in TEACHER_DIMS.values()
    ]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = sum(
            (1 - F.cosine_similarity(s.float(), ys, dim=-1)).mean() + F.mse_loss(d.float(), yd)
            for (s, d), (ys, yd) in zip(out, targets, strict=True)
        )
        loss.backward()  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    flops = count_flops(step)  # also the first warm-up step
    s = timed(step, device, 2, iters)
    params = sum(p.numel() for p in model.parameters())
    return {
        "params_m": params / 1e6,
        "batch": batch,
        "step_s": s,
        "images_per_s": batch / s,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / s / 1e12,
        "peak_mem_gib": peak_gib(device),
    }


def teacher_builders(tiny: bool) -> dict[str, tuple[Callable[[], nn.Module], int, int]]:
    """name -> (build, input px, patch): timm's own architectures of C-RADIOv4's teachers (random init)."""
    import timm

    small = {"embed_dim": 64, "depth": 2, "num_heads": 2} if tiny else {}

    def create(name: str, px: int, **kw: Any) -> Callable[[], nn.Module]:
        return lambda: timm.create_model(
            name, pretrained=False, num_classes=0, img_size=px, **{**kw, **small}
        )

    def sam3() -> nn.Module:
        from timm.models.vision_transformer_sam import VisionTransformerSAM

        dims = (
            dict(embed_dim=64, depth=4, num_heads=2) if tiny else dict(embed_dim=1024, depth=32, num_heads=16)
        )
        depth = int(dims["depth"])
        return VisionTransformerSAM(
            img_size=112 if tiny else 1008,
            patch_size=14,
            num_classes=0,
            use_rope=True,
            use_abs_pos=False,
            neck_chans=0,  # the trunk's 1024-d features, as the store keeps them
            window_size=4 if tiny else 24,
            global_attn_indexes=tuple(range(depth // 4 - 1, depth, depth // 4)),
            **dims,  # type: ignore[arg-type]
        )

    px = {"dino": 64 if tiny else 512, "siglip": 64 if tiny else 384, "sam": 112 if tiny else 1008}
    return {
        "dinov3_l": (create("vit_large_patch16_dinov3", px["dino"]), px["dino"], 16),
        "dinov3_7b": (create("vit_7b_patch16_dinov3", px["dino"]), px["dino"], 16),
        "siglip2_g": (create("vit_giantopt_patch16_siglip_384", px["siglip"]), px["siglip"], 16),
        "sam3": (sam3, px["sam"], 14),
    }


def bench_teacher(
    build: Callable[[], nn.Module], px: int, patch: int, batch: int, device: torch.device, iters: int
) -> dict[str, Any]:
    _reset(device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = build()
    model = model.to(dtype).eval().requires_grad_(False)
    x = torch.rand(batch, 3, px, px, device=device, dtype=dtype)
    features: Any = model.forward_features  # timm's, untyped

    @torch.inference_mode()
    def forward() -> torch.Tensor:
        out: torch.Tensor = features(x)
        return out

    flops = count_flops(forward)
    out = forward()
    s = timed(forward, device, 1, iters)
    grid = px // patch
    width = int(out.shape[-1] if out.ndim == 3 else out.shape[1])
    target_bytes = grid * grid * width * 2 + width * 4  # dense fp16 + summary fp32 per image
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "px": px,
        "batch": batch,
        "images_per_s": batch / s,
        "tflop_per_image": flops / batch / 1e12,
        "achieved_tflops": flops / s / 1e12,
        "target_bytes_per_image": target_bytes,
        "target_mb_per_s": target_bytes * batch / s / 1e6,
        "peak_mem_gib": peak_gib(device),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="Toy sizes (the CPU test).")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=10, help="Timed repetitions per configuration (median).")
    ap.add_argument("--budget-s", type=float, default=420.0, help="Skip what is left after this long.")
    ap.add_argument("--only", choices=["students", "teachers"], default=None)
    ap.add_argument("--out", default=None, help="Write the full result as JSON here.")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    res: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "matmul_tflops_measured": matmul_tflops(device, 256 if args.tiny else 8192, 3 if args.tiny else 20),
        "datasheet_bf16_tflops": sheet,
        "students": {},
        "teachers": {},
        "skipped": [],
    }
    ceiling = res["matmul_tflops_measured"]

    def over_budget(label: str) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            res["skipped"].append(label)
            return True
        return False

    sizes = {k: (64, 2, 2) for k in STUDENTS} if args.tiny else STUDENTS
    batches = {224: 64, 512: 16} if not args.tiny else {32: 4, 64: 2}
    hidden = 64 if args.tiny else 1024
    if args.only != "teachers":
        for key, size in sizes.items():
            for px, batch in batches.items():
                for prec in ("bf16", "fp32"):
                    label = f"{key}@{px}/{prec}"
                    if over_budget(label):
                        continue
                    try:
                        r = bench_student(size, px, batch, prec == "bf16", device, args.iters, hidden)
                        r["mfu_measured_ceiling"] = r["achieved_tflops"] / ceiling
                        r["mfu_datasheet"] = r["achieved_tflops"] / sheet if sheet else None
                    except Exception as e:  # out of memory, ...: record it, go on with the rest
                        r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                    res["students"][label] = r
                    print(label, json.dumps(r), file=sys.stderr, flush=True)
            if device.type == "cuda":
                for px in batches:
                    a, b = (
                        res["students"].get(f"{key}@{px}/bf16", {}),
                        res["students"].get(f"{key}@{px}/fp32", {}),
                    )
                    if "step_s" in a and "step_s" in b:
                        res["students"][f"{key}@{px}/bf16_speedup"] = b["step_s"] / a["step_s"]
    if args.only != "students":
        for tname, (build, px, patch) in teacher_builders(args.tiny).items():
            if over_budget(tname):
                continue
            batch = 2 if args.tiny else (8 if tname in ("dinov3_7b", "sam3") else 32)
            try:
                r = bench_teacher(build, px, patch, batch, device, args.iters)
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            res["teachers"][tname] = r
            print(tname, json.dumps(r), file=sys.stderr, flush=True)
    res["wall_s"] = time.perf_counter() - t_start
    res["imported"] = sorted(m for m in ("ray", "zarr", "pydantic", "radio_dist.config") if m in sys.modules)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    _table(res)
    return res


def _table(res: dict[str, Any]) -> None:
    print(
        f"{res['device']}: matmul {res['matmul_tflops_measured']:.0f} TFLOP/s measured, {res['wall_s']:.0f} s"
    )
    for k, r in res["students"].items():
        if isinstance(r, dict) and "step_s" in r:
            mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else ""
            print(
                f"student {k:14s} {r['step_s'] * 1e3:9.1f} ms/step {r['images_per_s']:8.1f} img/s "
                f"MFU {r['mfu_measured_ceiling']:.2f} {mem}"
            )
        elif isinstance(r, dict):
            print(f"student {k:14s} {r.get('error')}")
        else:
            print(f"student {k:14s} x{r:.2f}")
    for k, r in res["teachers"].items():
        if "images_per_s" in r:
            print(
                f"teacher {k:10s} {r['images_per_s']:8.1f} img/s {r['tflop_per_image']:.2f} TFLOP/img "
                f"{r['target_mb_per_s']:.1f} MB/s of targets"
            )
        else:
            print(f"teacher {k:10s} {r.get('error')}")


if __name__ == "__main__":
    main()
