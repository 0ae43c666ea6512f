"""`radio-dist plan`: the bill of a job, checked against hand-computed cases and against itself.

Models are built on the meta device (no weights, no memory), so C-RADIOv4's real teachers are costed here at
their real sizes. Hand cases: REFERENCE.md's "Cost arithmetic" (DINOv3-7B at 1024 px ≈ 66 TFLOP, SigLIP2-g at
384 ≈ 1.35, SAM3's encoder at 1008 ≈ 5.4, ViT-B training at 512 ≈ 0.65, online/cached ≈ 5.5× at E = 10).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from radio_dist import costs
from radio_dist.cache.config import CacheJobConfig
from radio_dist.cli import app
from radio_dist.config import load_model
from radio_dist.featsharp.train import FeatSharpConfig
from radio_dist.store import FeatureStore
from radio_dist.teacher import preset_spec
from radio_dist.testing import write_random_store
from radio_dist.train.config import DistillConfig
from radio_dist.train.students import StudentSpec, TeacherHeadInfo

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
CACHE = CONFIGS / "cradio_v4_cache.yaml"
DISTILL = CONFIGS / "cradio_v4_distill.yaml"
FEATSHARP = CONFIGS / "cradio_v4_featsharp.yaml"
H100 = costs.gpu("H100", 0.4)


@pytest.fixture(scope="module")
def recipe() -> CacheJobConfig:
    return load_model(CacheJobConfig, CACHE)


@pytest.fixture(scope="module")
def shape(recipe: CacheJobConfig) -> costs.CacheShape:
    return costs.cache_shape(recipe)


def test_the_formula_is_references() -> None:
    # 2·params·tokens + 4·layers·tokens²·width for global attention, by hand
    assert costs.transformer_flops(1e9, 100, 64, [100] * 3) == 2e9 * 100 + 4 * 3 * 100**2 * 64
    # a windowed block attends to its window only
    assert costs.transformer_flops(0, 100, 64, [100, 10]) == 4 * 100 * 64 * 110


def test_c_radio_v4_teachers_cost_what_reference_says(shape: costs.CacheShape) -> None:
    dino = costs.MetaTeacher(shape.teachers["dinov3"])
    f = dino.forward(1024)
    # DINOv3-7B: 40 blocks of 4096-d, 64x64 patches + CLS + 4 registers
    params = sum(p.numel() for p in dino.teacher.model.parameters())
    assert 6.6e9 < params < 6.8e9
    tokens = 64 * 64 + 5
    assert f.flops == pytest.approx(2 * params * tokens + 4 * 40 * tokens**2 * 4096)
    assert f.flops / 1e12 == pytest.approx(66, rel=0.02)
    assert f.dense == (64, 64, 4096) and f.summary_dim == 4096 and f.method == "formula"
    assert costs.MetaTeacher(shape.teachers["siglip2"]).forward(384).flops / 1e12 == pytest.approx(
        1.35, rel=0.06
    )
    sam = costs.MetaTeacher(shape.teachers["sam3"]).forward(1008)
    assert sam.flops / 1e12 == pytest.approx(5.4, rel=0.02)  # windows: 28 of 32 blocks attend to 24x24 tokens
    assert sam.dense == (72, 72, 1024) and sam.summary_dim is None


def test_the_formula_agrees_with_the_flop_counter() -> None:
    small = preset_spec("dinov3_tiny").model_copy(update={"options": {}})  # DINOv3 ViT-S/16 at its real size
    t = costs.MetaTeacher(small)
    f = t.forward(224)
    counted = costs.counted_flops(lambda: t.teacher.features(costs.meta_input(224)))
    assert f.method == "formula" and f.flops == pytest.approx(counted, rel=0.02)
    heads = {
        "a": TeacherHeadInfo(summary_dim=64, dense_dim=96),
        "b": TeacherHeadInfo(summary_dim=None, dense_dim=32),
    }
    s = costs.MetaStudent(StudentSpec(name="s", kind="cradio", arch="small"), heads)
    for px in (224, 512):
        assert s.forward_flops(px) == pytest.approx(s.counted_flops(px), rel=0.01)
    w = costs.MetaStudent(
        StudentSpec(name="w", kind="cradio", arch="small", window_size=8, global_every=3), heads
    )
    assert w.forward_flops(512) < s.forward_flops(512)  # windowed blocks cost less
    assert w.forward_flops(512) == pytest.approx(w.counted_flops(512), rel=0.05)
    # a CNN teacher has no formula: counted
    cnn = costs.MetaTeacher(preset_spec("mobilenet_v2")).forward(224)
    assert cnn.method == "counted" and 0.5e9 < cnn.flops < 0.7e9  # MobileNetV2: ~0.3 G multiply-adds


def test_vit_b_training_at_512_costs_what_reference_says() -> None:
    # REFERENCE: "Student training ≈ 3× forward (ViT-B at 512 ≈ 0.65 TFLOP)": the backbone, no heads
    one = {"t": TeacherHeadInfo(summary_dim=None, dense_dim=1)}
    s = costs.MetaStudent(
        StudentSpec(name="b", kind="cradio", arch="base", num_registers=0, head_hidden=1), one
    )
    assert 3 * s.forward_flops(512) / 1e12 == pytest.approx(0.65, rel=0.05)


def test_adaptations_are_costed_as_they_run(shape: costs.CacheShape) -> None:
    sam_low, sam_high = shape.part("sam3", "low"), shape.part("sam3", "high")
    assert sam_low is not None and sam_high is not None
    # mosaic: one 1008 px input carries 3x3 views of 336 px; each view keeps its own 24x24 grid
    assert sam_low.flops == pytest.approx(sam_high.cost / 9) and sam_low.model_inputs == pytest.approx(1 / 9)
    assert sam_low.dense == (24, 24, 1024)
    sig_low, sig_high = shape.part("siglip2", "low"), shape.part("siglip2", "high")
    assert sig_low is not None and sig_high is not None
    # FeatSharp x3: the low view and 3x3 tiles, each a 384 px forward; targets on the 72x72 grid
    assert sig_high.flops == pytest.approx(10 * sig_low.cost) and sig_high.dense == (72, 72, 1536)
    dino_low = shape.part("dinov3", "low")
    assert dino_low is not None and dino_low.dense == (27, 27, 4096) and dino_low.input_px == 432


def test_cache_bill_adds_up(recipe: CacheJobConfig) -> None:
    n = 1_000_000
    res = costs.plan_cache(recipe, n, H100)
    high = next(e for e in res["teachers"] if e["teacher"] == "dinov3" and e["partition"] == "high")
    # bytes by hand: 72x72 tokens of 4096 values + a float32 summary
    assert high["bytes_per_row_by_codec"]["fp16"] == 72 * 72 * 4096 * 2 + 4096 * 4
    assert (
        high["bytes_per_row_by_codec"]["int8"] == 72 * 72 * (4096 + 2) + 4096 * 4
    )  # + a float16 scale a token
    assert high["bytes_per_row_by_codec"]["nf4"] == 72 * 72 * (4096 / 2 + 4096 / 64 * 2) + 4096 * 4
    assert high["codec"] == "nf4" and high["bytes_per_row"] == high["bytes_per_row_by_codec"]["nf4"]
    assert high["gpu_hours"] == pytest.approx(high["tflop_per_row"] * 1e12 * n / (989e12 * 0.4) / 3600)
    targets = sum(e["bytes_per_row"] for e in res["teachers"])
    views = sum(v["bytes_per_row"] for v in res["views"].values())
    assert res["views"]["high"]["raw_bytes_per_row"] == 1152 * 1152 * 3
    assert (
        0 < res["views"]["high"]["bytes_per_row"] < res["views"]["high"]["raw_bytes_per_row"] / 5
    )  # jpeg-90
    assert res["per_image"]["bytes"] == pytest.approx(targets + views)
    assert res["total_bytes"] == pytest.approx((targets + views) * n)
    assert res["total_bytes_by_codec"]["fp16"] > res["total_bytes"] > res["total_bytes_by_codec"]["nf4"]
    # the pipeline runs at its slowest pool; balancing the same GPUs by FLOPs is never slower
    pl = res["pipeline"]
    rates = {p["teacher"]: p["rows_per_s"] for p in res["pools"]}
    assert pl["rows_per_s"] == min(rates.values()) and rates[pl["bottleneck"]] == pl["rows_per_s"]
    assert pl["balanced_rows_per_s"] >= pl["rows_per_s"]
    assert sum(pl["balanced_gpus"].values()) == pytest.approx(pl["gpus"]) == 32
    assert pl["write_bytes_per_s"] == pytest.approx(pl["rows_per_s"] * (targets + views))
    # a pool starved of GPUs becomes the bottleneck, and the wall-clock grows
    starved = load_model(CacheJobConfig, CACHE, ["teachers.2.runtime.pool_size=1"])
    res2 = costs.plan_cache(starved, n, H100)
    assert res2["pipeline"]["bottleneck"] == "sam3" and res2["pipeline"]["wall_hours"] > pl["wall_hours"]
    # K cached views per image: K rows, K times the compute and bytes
    four = costs.plan_cache(load_model(CacheJobConfig, CACHE, ["source.augment.views=4"]), n, H100)
    assert four["rows"] == 4 * n and four["total_bytes"] == pytest.approx(4 * res["total_bytes"])
    assert four["per_image"]["gpu_hours_total"] == pytest.approx(4 * res["per_image"]["gpu_hours_total"])


def test_online_over_cached_is_references_example() -> None:
    # REFERENCE: ≈5.5× at E = 10 for T ≈ 72.8 and ΣS ≈ 7.25 TFLOP (one partition: T_step = T_all)
    assert costs.online_over_cached(10, 72.8, 72.8, 7.25) == pytest.approx(5.51, abs=0.01)
    assert costs.online_over_cached(1, 5.0, 5.0, 1.0) == pytest.approx(1.0)  # one epoch: the same work


def test_distill_bill(recipe: CacheJobConfig, shape: costs.CacheShape) -> None:
    cfg = load_model(DistillConfig, DISTILL)
    n = 1_000_000
    res = costs.plan_distill(cfg, shape, n, H100)
    gb = cfg.train.batch_size * cfg.scaling.num_workers
    assert res["global_batch"] == gb and res["steps"] == math.ceil(n / gb) * cfg.train.epochs
    assert [s["student"] for s in res["students"]] == ["cradio_so400m", "cradio_base", "cradio_small"]
    per = {s["student"]: s for s in res["students"]}
    assert (
        per["cradio_so400m"]["tflop_per_sample"]
        > per["cradio_base"]["tflop_per_sample"]
        > per["cradio_small"]["tflop_per_sample"]
    )
    for s in res["students"]:
        fwd = s["tflop_forward_by_px"]
        assert (
            sorted(fwd) == [128, 192, 224, 256, 384, 432, 512, 768, 1024, 1152] and fwd[1152] > 40 * fwd[128]
        )
        # training = 3 forwards + MESA's EMA forward, averaged over the resolution mix
        mean = sum(r["probability"] * fwd[r["px"]] for r in res["resolutions"])
        assert s["tflop_per_sample"] == pytest.approx(4 * mean)
        assert s["gpu_hours"] == pytest.approx(
            s["tflop_per_step"] * 1e12 * res["steps"] / (989e12 * 0.4) / 3600
        )
    assert sum(r["probability"] for r in res["resolutions"]) == pytest.approx(1.0)
    assert res["gpu_hours"] == pytest.approx(sum(s["gpu_hours"] for s in res["students"]))
    # reads: a high-partition sample carries the 1152 px targets
    reads = res["reads"]
    assert reads["high"]["bytes_per_sample"] > 3 * reads["low"]["bytes_per_sample"]
    for r in reads.values():
        assert r["read_bytes_per_s_per_gpu"] == pytest.approx(
            r["bytes_per_sample"] * r["samples_per_s_per_gpu"]
        )
    c = res["cached_vs_online"]
    assert c["online_over_cached"] == pytest.approx(
        costs.online_over_cached(
            10,
            c["teacher_tflop_per_sample_online"],
            c["teacher_tflop_per_row_cached"],
            c["students_tflop_per_sample"],
        )
    )
    assert c["online_over_cached"] > 1.5  # C-RADIOv4's teachers dwarf its students
    # one epoch: caching first buys nothing (the cache runs every partition, online only the step's)
    one = costs.plan_distill(load_model(DistillConfig, DISTILL, ["train.epochs=1"]), shape, n, H100)
    assert one["cached_vs_online"]["online_over_cached"] < 1
    # one view per image of a K-view store: an epoch is the images, not the rows
    k4 = costs.CacheShape(**{**shape.__dict__, "rows_per_image": 4})
    assert costs.plan_distill(cfg, k4, n, H100)["rows_per_epoch"] == 4 * n
    one_view = load_model(DistillConfig, DISTILL, ["train.views=one"])
    assert costs.plan_distill(one_view, k4, n, H100)["rows_per_epoch"] == n


def test_distill_bill_from_an_existing_store(tmp_path: Path) -> None:
    # a real store whose recorded teachers this version cannot build: bytes from what it recorded, no FLOPs
    url = str(tmp_path / "store")
    write_random_store(
        url, [5, 5], {"a": (4, 32, 16), "b": (2, 8, None)}, {"low": 64, "high": 128}, codec="int8"
    )
    store = FeatureStore(url)
    shape = costs.store_shape(store.meta())
    a_high = shape.part("a", "high")
    assert (
        a_high is not None and a_high.dense == (8, 8, 32) and a_high.flops is None and a_high.codec == "int8"
    )
    cfg = DistillConfig.model_validate({"store": {"url": url}, "out": str(tmp_path / "run")})
    res = costs.plan_distill(cfg, shape, 10, H100)
    assert res["cached_vs_online"]["online_over_cached"] is None
    assert res["reads"]["high"]["bytes_per_sample"] == pytest.approx(
        8 * 8 * (32 + 2) + 16 * 4 + 4 * 4 * (8 + 2) + 128 * 128 * 3
    )
    # the CLI reads the store itself, its rows the images
    r = CliRunner().invoke(app, ["plan", "--config", str(write_yaml(tmp_path, cfg)), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == 10


def write_yaml(tmp_path: Path, cfg: DistillConfig) -> Path:
    import yaml

    p = tmp_path / "distill.yaml"
    p.write_text(yaml.safe_dump({"store": {"url": cfg.store.url}, "out": cfg.out}))
    return p


@pytest.mark.parametrize(
    ("args", "job"),
    [
        (["--config", str(CACHE), "--images", "100000000"], "cache-teachers"),
        (["--config", str(DISTILL), "--cache", str(CACHE)], "distill"),
        (["--config", str(FEATSHARP)], "featsharp"),
        (["--config", str(CONFIGS / "cache_sample.yaml")], "cache-teachers"),
        (["--config", str(CONFIGS / "featsharp_sample.yaml"), "--gpu", "A100", "--mfu", "0.5"], "featsharp"),
    ],
)
def test_plan_cli(args: list[str], job: str) -> None:
    r = CliRunner().invoke(app, ["plan", *args, "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["job"] == job and res["gpu"]["mfu"] in (0.4, 0.5)
    wide = CliRunner().invoke(app, ["plan", *args], env={"COLUMNS": "80"})
    assert wide.exit_code == 0, wide.output
    assert max(len(line) for line in wide.stdout.splitlines()) <= 80


def test_featsharp_bill() -> None:
    res = costs.plan_featsharp(load_model(FeatSharpConfig, FEATSHARP), H100)
    assert res["teacher_forwards_per_image"] == 1 + 9 + 5  # low view, 3x3 tiles, 5 jitters
    assert res["tflop_per_step"] == pytest.approx(15 * res["tflop_per_teacher_forward"] * 8 * 8)


def test_plan_refuses_bad_input(tmp_path: Path) -> None:
    run = CliRunner()
    r = run.invoke(app, ["plan", "--config", str(CACHE), "--gpu", "V100"])
    assert r.exit_code == 2 and "--gpu 'V100'" in r.output and "--peak-tflops" in r.output
    r = run.invoke(app, ["plan", "--config", str(CACHE), "--gpu", "V100", "--peak-tflops", "125", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["gpu"]["peak_tflops"] == 125
    r = run.invoke(app, ["plan", "--config", str(CACHE), "--mfu", "40"])
    assert r.exit_code == 2 and "--mfu 40" in r.output
    # a distill job over a store that does not exist yet needs the caching job
    r = run.invoke(app, ["plan", "--config", str(DISTILL), "--set", f"store.url={tmp_path / 'none'}"])
    assert r.exit_code == 2 and "--cache" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("foo: 1\n")
    r = run.invoke(app, ["plan", "--config", str(bad)])
    assert r.exit_code == 2 and "--job" in r.output
    r = run.invoke(app, ["plan", "--config", str(CACHE), "--set", "teachers.1.resolution.high=1000"])
    assert r.exit_code == 2 and "siglip2" in r.output  # FeatSharp x3 of 384 px cannot make 1000 px


def test_a_mosaic_at_a_size_it_cannot_tile_is_refused(recipe: CacheJobConfig) -> None:
    bad = load_model(CacheJobConfig, CACHE, ["teachers.2.resolution.low=400"])
    with pytest.raises(costs.PlanError, match="sam3.*400 px"):
        costs.cache_shape(bad)
