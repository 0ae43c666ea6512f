"""FeatSharp end to end: a Ray Train job on real photos, resumable; held-out report vs bilinear; caching a
high partition through it; fingerprints that follow the file's content.

The teacher is SigLIP2's architecture at a random-init tiny size (``siglip2_tiny`` at 96 px -> 6x6 tokens), so
the jobs pay Ray Train's start-up rather than teacher compute; the README's figure with a real pretrained
teacher (MobileNetV2) comes from ``jobs/configs/featsharp_sample.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from radio_dist.cache.config import CacheJobConfig
from radio_dist.cache.pipeline import run_cache
from radio_dist.config import ConfigError
from radio_dist.featsharp.file import featsharp_bytes, load_featsharp
from radio_dist.featsharp.report import evaluate_file
from radio_dist.featsharp.train import FeatSharpConfig, run_featsharp
from radio_dist.featsharp.views import split_held_out
from radio_dist.sources import SourceConfig, list_items
from radio_dist.store import FeatureStore, verify_store
from radio_dist.teacher import TeacherSpec, create_teacher, fingerprint, preset_spec
from radio_dist.train.rundir import read_metrics

STEPS = 100


def job(out: Path, **over) -> FeatSharpConfig:
    data = {
        "teacher": "siglip2_tiny",
        "low": 96,
        # all 13 sample photos (the job holds out its own 2): the figures below were measured on them
        "source": {"kind": "sample-photos", "views": 26, "photos": "all"},
        "out": str(out),
        "held_out": 2,
        "phis_images": 16,
        "upsampler": {"factor": 3, "hidden": 64, "heads": 4, "window": 6, "down_kernel": 9},
        "train": {
            "steps": STEPS,
            "batch_size": 4,
            "jitters": 3,
            "lr": 1e-3,
            "checkpoint_every": 50,
            "log_every": 25,
            "threads": 1,
        },
        "report_jitters": 4,
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return FeatSharpConfig.model_validate(data)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("featsharp") / "run"
    summary = run_featsharp(job(out))
    return out, summary


def test_config_refusals(tmp_path):
    with pytest.raises(ValueError, match="adaptation=featsharp needs options.featsharp"):
        TeacherSpec(name="s", family="siglip2", adaptation="featsharp")
    with pytest.raises(ValueError, match="options.featsharp is set but adaptation is 'none'"):
        TeacherSpec(name="s", family="siglip2", options={"featsharp": "x.safetensors"})
    with pytest.raises(ValueError, match="set `low`"):
        FeatSharpConfig.model_validate({"teacher": "siglip2_tiny", "out": str(tmp_path)})
    with pytest.raises(ValueError, match="teacher 'no_such_teacher'"):
        FeatSharpConfig.model_validate({"teacher": "no_such_teacher", "low": 64})
    with pytest.raises(ValueError, match="down_kernel=9 must be >= factor=2 with an even difference"):
        FeatSharpConfig.model_validate({"teacher": "siglip2_tiny", "low": 64, "upsampler": {"factor": 2}})
    sam3 = preset_spec("sam3_tiny")  # a mosaic teacher: FeatSharp trains on the teacher as it is
    with pytest.raises(ValueError, match="set teacher.adaptation: none"):
        FeatSharpConfig.model_validate({"teacher": sam3.model_dump(mode="json"), "low": 64})


def test_held_out_photos_are_whole_and_stable():
    items = list_items(SourceConfig(views=60))
    train, held = split_held_out(items, 3)
    held_photos = {it.photo for it in held}
    assert len(held_photos) == 3 and len(train) + len(held) == len(items)
    assert not held_photos & {it.photo for it in train}  # no view of a held-out photo is trained on
    assert split_held_out(list_items(SourceConfig(views=40)), 3)[1][0].uri in {it.uri for it in held}
    with pytest.raises(ConfigError, match="holding out 13 leaves none"):
        split_held_out(items, 13)


def test_trains_exports_and_beats_bilinear_on_held_out_photos(trained):
    out, summary = trained
    lines = read_metrics(str(out), step_key="step")
    assert [m["step"] for m in lines] == list(range(25, STEPS + 1, 25))
    assert lines[-1]["loss"] < lines[0]["loss"]
    report = json.loads((out / "report.json").read_text())
    assert report == summary["report"]
    fs = load_featsharp(str(out / "featsharp.safetensors"))
    assert fs.factor == 3 and fs.low_px == 96 and fs.meta["steps"] == STEPS
    assert sorted(report["held_out_photos"]) == fs.meta["held_out_photos"]
    print(
        f"held-out consistency MSE (PHI-S): featsharp {report['featsharp_mse']:.4f} vs bilinear "
        f"{report['bilinear_mse']:.4f}; cosine {report['featsharp_cos']:.3f} vs {report['bilinear_cos']:.3f}"
    )
    assert report["featsharp_mse"] < 0.9 * report["bilinear_mse"]
    # the file evaluates on its own: same jitters (seed), same held-out photos -> the training job's figure
    again = evaluate_file(
        str(out / "featsharp.safetensors"),
        SourceConfig(views=26, photos="all"),
        images=64,
        jitters=4,
        seed=1,
    )
    assert again["images"] == report["images"]
    assert again["featsharp_mse"] == pytest.approx(report["featsharp_mse"], rel=1e-4)


@pytest.mark.slow  # ~80 s: two more Ray Train jobs
def test_a_stopped_job_resumes_to_the_same_weights(trained, tmp_path, ray_local):
    """Stop after step 63 (checkpoint at 50), relaunch: it continues from step 50 and ends where an
    uninterrupted run ends (per-step seeds, optimizer state and PHI-S in the checkpoint)."""
    ref_out, _ = trained
    out = tmp_path / "run"
    with pytest.raises(Exception, match="stop_after_step"):
        run_featsharp(job(out, debug={"stop_after_step": 63}))
    assert not (out / "featsharp.safetensors").exists()
    run_featsharp(job(out, debug={"stop_after_step": 63}))  # marker written: this attempt runs through
    a = load_featsharp(str(out / "featsharp.safetensors")).model.state_dict()
    b = load_featsharp(str(ref_out / "featsharp.safetensors")).model.state_dict()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs after resuming")
    steps = [m["step"] for m in read_metrics(str(out), step_key="step")]
    assert steps == list(range(25, STEPS + 1, 25))


def featsharp_spec(path: Path) -> TeacherSpec:
    base = preset_spec("siglip2_tiny").model_dump(mode="json")
    return TeacherSpec.model_validate(
        {
            **base,
            "adaptation": "featsharp",
            "options": {**base["options"], "featsharp": str(path)},
            "resolution": {"low": 96, "high": 288},
        }
    )


def test_caches_the_high_partition_through_featsharp(trained, tmp_path, ray_local):
    out, _ = trained
    spec = featsharp_spec(out / "featsharp.safetensors")
    store_url = str(tmp_path / "store")
    cfg = CacheJobConfig.model_validate(
        {
            "source": {"kind": "sample-photos", "views": 12},
            "teachers": [spec.model_dump(mode="json")],
            "store": {"url": store_url, "shard_size": 6},
            "pipeline": {"partitions": {"low": 96, "high": 288}},
            "phis": {"fit_images": 8},
        }
    )
    summary = run_cache(cfg)
    assert summary.ok == 12
    store = FeatureStore(store_url)
    assert verify_store(store)["ok"]
    # the teacher's model ran on 1 input per image at low, 1 + 3x3 (view + tiles) per image at high
    assert summary.teacher_inputs[spec.name] == {"low": 12, "high": 12 * 10}, summary.teacher_inputs
    outputs = {p: o.model_dump() for p, o in store.meta().teachers[spec.name].outputs.items()}
    assert outputs["low"]["dense"] == [6, 6, 64] and outputs["high"]["dense"] == [18, 18, 64], outputs
    assert store.meta().teachers[spec.name].fingerprint == fingerprint(spec)
    # a direct call: the 18x18 FeatSharp grid (not the teacher's 6x6), the low view's summary
    t = create_teacher(spec)
    o = t(np.zeros((2, 288, 288, 3), np.uint8))
    assert tuple(o.dense.shape) == (2, 18, 18, 64) and o.summary is not None and t.model_inputs == 20


def test_fingerprint_follows_the_featsharp_file(trained, tmp_path):
    out, _ = trained
    fs = load_featsharp(str(out / "featsharp.safetensors"))
    p = tmp_path / "fs.safetensors"
    p.write_bytes((out / "featsharp.safetensors").read_bytes())
    fp1 = fingerprint(featsharp_spec(p))
    assert fp1 == fingerprint(featsharp_spec(out / "featsharp.safetensors"))  # content, not path
    with torch.no_grad():
        fs.model.noise.add_(0.01)
    p.write_bytes(featsharp_bytes(fs.model, fs.phis, fs.meta))
    assert fingerprint(featsharp_spec(p)) != fp1
    # a file trained for another teacher model is refused by name
    other = preset_spec("siglip2_tiny").model_dump(mode="json")
    other["options"] = {**other["options"], "depth": 1, "featsharp": str(p)}
    other["adaptation"] = "featsharp"
    with pytest.raises(ValueError, match="was trained for teacher 'siglip2_tiny'"):
        create_teacher(TeacherSpec.model_validate(other))
    with pytest.raises(FileNotFoundError, match="FeatSharp file .*nope.safetensors does not exist"):
        fingerprint(featsharp_spec(tmp_path / "nope.safetensors"))  # what a cache job checks first
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=f"FeatSharp file {bad} is not a safetensors file"):
        load_featsharp(str(bad))


def test_cli_names_bad_input(tmp_path):
    from typer.testing import CliRunner

    from radio_dist.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["featsharp", "eval", str(tmp_path / "missing.safetensors")])
    assert res.exit_code == 2 and "missing.safetensors does not exist" in res.output
    res = runner.invoke(app, ["featsharp", "train", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "no teacher given" in res.output
    res = runner.invoke(
        app, ["featsharp", "train", "--set", "teacher=siglip2_tiny", "--set", "upsampler.factr=2"]
    )
    assert res.exit_code == 2 and "factr" in res.output
    assert not (tmp_path / "run").exists()  # nothing written for a refused job
