"""The C-RADIOv4 recipe (jobs/configs/cradio_v4_*.yaml) cannot rot: every shipped config validates, the recipe
says what the method and the models' cards say, and the three jobs run end to end on CPU with the tiny
overrides of jobs/configs/tiny/ (the same `--set` lines `make recipe-tiny` passes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from radio_dist import costs
from radio_dist.cache.config import CacheJobConfig
from radio_dist.cli import app
from radio_dist.config import load_model, read_yaml
from radio_dist.featsharp.train import FeatSharpConfig
from radio_dist.store import FeatureStore
from radio_dist.train.config import DistillConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
TINY = CONFIGS / "tiny"
MODELS: dict[str, type[BaseModel]] = {
    "cache": CacheJobConfig,
    "distill": DistillConfig,
    "featsharp": FeatSharpConfig,
}
RECIPE = ("cradio_v4_featsharp", "cradio_v4_cache", "cradio_v4_distill")  # in the order they run


def tiny_sets(name: str) -> list[str]:
    lines = (TINY / f"{name}.sets").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def load(name: str, sets: list[str] | None = None) -> BaseModel:
    path = CONFIGS / f"{name}.yaml"
    return load_model(MODELS[costs.job_kind(read_yaml(path))], path, sets or [])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    kind = costs.job_kind(read_yaml(path))
    load_model(MODELS[kind], path)
    tiny = TINY / f"{path.stem}.sets"
    if tiny.exists():
        load_model(MODELS[kind], path, tiny_sets(path.stem))
    for line in tiny_sets(path.stem) if tiny.exists() else []:
        # the Makefile hands each line to the shell unquoted: no spaces, quotes or braces
        assert not set(line) & set(" '\"{}$`*?"), f"{tiny.name}: {line!r} is not shell-safe"


def test_the_recipe_follows_the_method_and_the_model_cards() -> None:
    cache = load("cradio_v4_cache")
    assert isinstance(cache, CacheJobConfig)
    assert cache.pipeline.partitions == {"low": 432, "high": 1152}
    t = {s.name: s for s in cache.teachers}
    dino, sig, sam = t["dinov3"], t["siglip2"], t["sam3"]
    assert (dino.arch, dino.patch_size, dino.num_prefix_tokens, dino.summary) == (
        "vit_7b_patch16_dinov3",
        16,
        5,
        "cls",
    )
    assert dino.mean == (0.485, 0.456, 0.406) and dino.std == (0.229, 0.224, 0.225)
    assert (sig.arch, sig.patch_size, sig.num_prefix_tokens, sig.summary) == (
        "vit_giantopt_patch16_siglip_384",
        16,
        0,
        "map",
    )
    assert sig.mean == sig.std == (0.5, 0.5, 0.5)
    assert sig.adaptation == "featsharp" and sig.resolution == {"low": 384, "high": 1152}
    assert (sam.patch_size, sam.num_prefix_tokens, sam.adaptation) == (14, 0, "mosaic")
    assert sam.options["img_size"] == 1008 and sam.resolution == {"low": 336, "high": 1008}
    assert sam.mean == sam.std == (0.5, 0.5, 0.5)
    for spec in cache.teachers:
        assert spec.weights.kind.value == "file" and spec.runtime.num_gpus >= 1, spec.name
    # the FeatSharp job trains the upsampler for exactly the teacher the cache job runs through it
    fs = load("cradio_v4_featsharp")
    assert isinstance(fs, FeatSharpConfig)
    # (what the file records, teacher_model_key, also hashes the weights file, absent here: the specs must match)
    assert fs.teacher.model_dump(exclude={"runtime"}) == sig.without_adaptation().model_dump(
        exclude={"runtime"}
    )
    assert fs.low_px * fs.upsampler.factor == 1152
    distill = load("cradio_v4_distill")
    assert isinstance(distill, DistillConfig)
    tr = distill.train
    assert tr.resolutions == {"low": [128, 192, 224, 256, 384, 432], "high": [512, 768, 1024, 1152]}
    assert tr.max_shift > 0 and tr.mesa_weight > 0 and tr.damp_sigma > 0 and tr.summary_weight > 0
    assert tr.precision == "bf16" and distill.scaling.use_gpu
    big = distill.students[0]
    assert (big.kind, big.arch, big.parallel) == ("cradio", "so400m", "fsdp")
    assert {s.parallel for s in distill.students[1:]} == {"ddp"}
    assert distill.store.url == cache.store.url


def run_cli(args: list[str]) -> dict:
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.slow  # ~2.5 min: the recipe's three jobs at toy size (FeatSharp, caching, distillation); CI runs it
def test_the_recipe_runs_end_to_end_at_toy_size(ray_local, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fs_out, store, run = runs / "featsharp", runs / "store", runs / "distill"
    fs = ["--config", str(CONFIGS / "cradio_v4_featsharp.yaml")]
    for line in [*tiny_sets("cradio_v4_featsharp"), f"out={fs_out}"]:
        fs += ["--set", line]
    res = run_cli(["featsharp", "train", *fs])
    assert res["steps"] == 2 and (fs_out / "featsharp.safetensors").is_file()

    cache = ["--config", str(CONFIGS / "cradio_v4_cache.yaml")]
    extra = [f"store.url={store}", f"teachers.1.options.featsharp={fs_out / 'featsharp.safetensors'}"]
    for line in [*tiny_sets("cradio_v4_cache"), *extra]:
        cache += ["--set", line]
    res = run_cli(["cache-teachers", *cache])
    assert res["ok"] == 6 and res["error"] == 0
    meta = FeatureStore(str(store)).meta()
    assert meta.partitions == {"low": 432, "high": 1152} and meta.view_codec == "jpeg-90"
    shapes = {(t, p): rec.outputs[p].dense for t, rec in meta.teachers.items() for p in rec.outputs}
    assert shapes[("dinov3", "low")] == [27, 27, 64] and shapes[("dinov3", "high")] == [72, 72, 64]
    assert shapes[("siglip2", "low")] == [24, 24, 64] and shapes[("siglip2", "high")] == [
        72,
        72,
        64,
    ]  # FeatSharp
    assert shapes[("sam3", "low")] == [24, 24, 64] and shapes[("sam3", "high")] == [
        72,
        72,
        64,
    ]  # mosaic, native
    assert {p: c for p, c in meta.teachers["dinov3"].codecs.items()} == {"low": "int8", "high": "nf4"}
    verify = CliRunner().invoke(app, ["store", "verify", str(store)])
    assert verify.exit_code == 0, verify.output

    distill = ["--config", str(CONFIGS / "cradio_v4_distill.yaml")]
    for line in [*tiny_sets("cradio_v4_distill"), f"store.url={store}", f"out={run}"]:
        distill += ["--set", line]
    res = run_cli(["distill", *distill])
    assert res["global_step"] == 3
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "global_step" in m and "cradio_so400m/total" in m]
    assert len(steps) == 3
    for m in steps:
        for s in ("cradio_so400m", "cradio_base", "cradio_small"):
            assert m[f"{s}/total"] == m[f"{s}/total"] and m[f"{s}/total"] < 1e3, (
                s,
                m,
            )  # finite, not blown up
    for s in ("cradio_so400m", "cradio_base", "cradio_small"):
        assert (run / "students" / s).is_dir()

    # the bill of the tiny run's distillation, read from the store it made
    plan = run_cli(["plan", *distill])
    assert plan["images"] == 6 and {s["student"] for s in plan["students"]} == {
        "cradio_so400m",
        "cradio_base",
        "cradio_small",
    }


def test_makefile_runs_the_recipe_in_order() -> None:
    text = (REPO / "Makefile").read_text()
    block = text[text.index("recipe-tiny:") :].split("\n\n", 1)[0]
    assert all(name in block for name in RECIPE), block
    assert sorted(RECIPE, key=block.index) == list(RECIPE), (
        block
    )  # FeatSharp, then caching, then distillation
