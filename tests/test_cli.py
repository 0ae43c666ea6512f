"""The CLI as a user drives it (typer's CliRunner in-process; the caching run uses the shared local Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from fixtures import write_good_photos
from PIL import Image
from typer.testing import CliRunner

from radio_dist.cache.config import CacheJobConfig
from radio_dist.cli import app
from radio_dist.config import ConfigError, load_model
from radio_dist.store import FeatureStore, array_key

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_teachers_list():
    res = runner.invoke(app, ["teachers", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["family"]: r for r in json.loads(res.stdout)}
    assert rows["efficientnet_lite0"]["preset"] == "effnet_lite0" and rows["timm"]["preset"] is None
    # SAM3 implements the mosaic itself; FeatSharp wraps any family
    assert rows["sam3"]["adaptations"] == ["featsharp", "mosaic"]
    assert rows["mobilenet_v2"]["adaptations"] == ["featsharp"]
    table = runner.invoke(app, ["teachers", "list"])
    assert table.exit_code == 0 and "adaptation mosaic (options: mosaic_k)" in table.stdout


def test_example_job_config_validates():
    cfg = load_model(CacheJobConfig, REPO / "jobs/configs/cache_sample.yaml")
    assert [t.name for t in cfg.teachers] == ["effnet_lite0", "mobilenet_v2"]


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load((REPO / "jobs/configs/cache_sample.yaml").read_text())
    data["teachers"][1]["runtime"]["batchsize"] = 8
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"teachers\.1\.runtime\.batchsize: unknown key 'batchsize'"):
        load_model(CacheJobConfig, bad)
    res = runner.invoke(app, ["cache-teachers", "--config", str(bad)])
    assert res.exit_code == 2 and "unknown key 'batchsize'" in res.output


def test_cache_teachers_needs_a_store_and_known_teachers():
    res = runner.invoke(app, ["cache-teachers"])
    assert res.exit_code == 2 and "--store" in res.output
    res = runner.invoke(app, ["cache-teachers", "--store", "/tmp/x", "--teachers", "resnet9000"])
    assert res.exit_code == 2 and "unknown teacher family 'resnet9000'" in res.output


def test_store_commands_on_a_non_store(tmp_path):
    res = runner.invoke(app, ["store", "info", str(tmp_path)])
    assert res.exit_code == 2 and "not a radio-dist store" in res.output


def test_overrides_start_from_the_defaults():
    """`--set a.b.c=v` on a key the file leaves out adds to the default instead of replacing it."""
    from radio_dist.cli.cache import build_cache_config
    from radio_dist.cli.train import build_distill_config

    cfg = build_cache_config(
        None, None, "s", None, None, None,
        ["pipeline.partitions.high=448", "teachers.0.runtime.env.EXTRA=x"],
    )  # fmt: skip
    assert cfg.pipeline.partitions == {"low": 224, "high": 448}
    env = cfg.teachers[0].runtime.env
    assert env["EXTRA"] == "x" and env["MALLOC_ARENA_MAX"] == "1"  # the allocator defaults kept
    cfg = build_cache_config(None, None, "s", None, None, None, ["pipeline.partitions={high: 448}"])
    assert cfg.pipeline.partitions == {"high": 448}  # a whole mapping replaces
    dcfg = build_distill_config(None, "s", "o", ["train.resolutions.low=[128, 160]", "scaling.num_workers=2"])
    assert dcfg.train.resolutions == {"low": [128, 160]} and dcfg.scaling.num_workers == 2
    assert dcfg.scaling.max_failures == 2  # the rest of the section keeps its defaults
    with pytest.raises(ConfigError, match="not a mapping"):
        build_cache_config(None, None, "s", None, None, None, ["store.url.x=1"])


def test_cache_info_verify_from_a_folder(tmp_path, ray_local):
    photos = tmp_path / "photos"
    write_good_photos(photos, 6)
    (photos / "notes.txt").write_text("not an image")
    store = str(tmp_path / "store")
    res = runner.invoke(
        app,
        [
            "cache-teachers",
            "--source",
            str(photos),
            "--store",
            store,
            "--set",
            "pipeline.partitions.low=64",
            "--set",
            "phis.fit_images=4",
            "--set",
            "store.shard_size=4",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (summary["ok"], summary["error"]) == (6, 1)
    assert any("notes.txt" in e["error"] for e in summary["errors"])

    res = runner.invoke(app, ["store", "info", store, "--json"])
    info = json.loads(res.stdout)
    assert (info["rows_ok"], info["rows_error"]) == (6, 1)
    assert info["teachers"]["mobilenet_v2"]["outputs"]["low"]["dense"] == [2, 2, 1280]
    assert info["bytes_per_image"] > 64 * 64 * 3

    res = runner.invoke(app, ["store", "verify", store])
    assert res.exit_code == 0 and "OK" in res.stdout
    # flip one stored value: verify must fail and say where
    fs = FeatureStore(store)
    shard = next(r["shard"] for r in fs.manifest().to_pylist() if r["status"] == "ok")
    arr = zarr.open_array(fs.zarr_store(shard), path=array_key("mobilenet_v2", "low", "dense"), mode="r+")
    arr[0, 0, 0, 0] = arr[0, 0, 0, 0] + 1
    res = runner.invoke(app, ["store", "verify", store])
    assert res.exit_code == 1 and f"shard {shard}: checksum mismatch" in res.output


def test_a_source_with_nothing_decodable_fails_clearly(tmp_path, ray_local):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (bad / "b.txt").write_text("hello")
    res = runner.invoke(
        app,
        [
            "cache-teachers",
            "--source",
            str(bad),
            "--store",
            str(tmp_path / "s"),
            "--set",
            "pipeline.partitions.low=64",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "no decodable image among the first" in res.output


def test_example_distill_config_validates_and_bad_input_is_named(tmp_path):
    from radio_dist.train.config import DistillConfig

    cfg = load_model(DistillConfig, REPO / "jobs/configs/distill_sample.yaml")
    assert [s.name for s in cfg.students] == ["cradio", "vit_tiny", "convnext_atto"]
    assert cfg.train.resolutions == {"low": [128, 160, 192, 224, 256]}
    res = runner.invoke(app, ["distill", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "--store" in res.output
    res = runner.invoke(
        app, ["distill", "--store", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")]
    )
    assert res.exit_code == 2 and "not a radio-dist store" in res.output
    res = runner.invoke(app, ["distill", "--store", "x", "--out", "y", "--set", "students.0.arch=gigantic"])
    assert res.exit_code == 2 and "students.0" in res.output and "gigantic" in res.output
    res = runner.invoke(app, ["distill", "--store", "x", "--out", "y", "--set", "train.damp_schedule=wobbly"])
    assert res.exit_code == 2 and "damp_schedule" in res.output
    res = runner.invoke(app, ["eval", str(tmp_path), "--store", "x"])
    assert res.exit_code == 2 and "no exported students" in res.output


def test_eval_scores_on_photos_the_store_never_saw(tmp_path, ray_local):
    """`radio-dist eval --source`: images the store holds (or views of photos it trained on) are refused; with no
    --source the sample photos every default store keeps out are used. An untrained exported student suffices:
    this is about which photos are scored, not about how well."""
    from radio_dist.train.students import StudentSpec, TeacherHeadInfo, build_student, export_student

    photos = tmp_path / "photos"
    paths = write_good_photos(photos, 4, max_side=160)
    store = str(tmp_path / "store")
    sets = ["pipeline.partitions.low=64", "phis.fit_images=4", "store.shard_size=4"]
    args = ["cache-teachers", "--source", str(photos), "--store", store, "--json"]
    res = runner.invoke(app, [*args, *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    fs = FeatureStore(store)
    meta = fs.meta()
    heads = {
        t: TeacherHeadInfo(summary_dim=r.outputs["low"].summary_dim, dense_dim=r.outputs["low"].dense_dim)
        for t, r in meta.teachers.items()
    }
    spec = StudentSpec(name="cradio", kind="cradio", arch="tiny")
    export_student(build_student(spec, heads), str(tmp_path / "run" / "students" / "cradio"),
                   {t: fs.phis(t) for t in heads})  # fmt: skip
    run = str(tmp_path / "run")

    # the folder it cached: every image refused, one line saying what to do
    res = runner.invoke(app, ["eval", run, "--store", store, "--source", str(photos)])
    assert res.exit_code == 2 and "4 are in" in res.output and "--source" in res.output, res.output
    # two of the cached photos plus two it never saw: only the new ones are scored
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in paths[:2]:
        (mixed / p.name).write_bytes(p.read_bytes())
    write_good_photos(tmp_path / "new", 8, max_side=160)
    for p in sorted((tmp_path / "new").iterdir())[4:6]:  # photos 4 and 5 of the sample set: not in the store
        (mixed / p.name).write_bytes(p.read_bytes())
    res = runner.invoke(
        app, ["eval", run, "--store", store, "--source", str(mixed), "--resolutions", "64", "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["images"], doc["refused"], doc["source"]) == (2, 2, str(mixed))
    # no --source: views of the photos the default sample source keeps out of every store
    res = runner.invoke(app, ["eval", run, "--store", store, "--images", "5", "--resolutions", "64,96"])
    assert res.exit_code == 0, res.output
    assert (
        "fidelity on 5 held-out photos (sample-photos (eval)" in res.output and "(store mean)" in res.output
    )
    assert max(len(line) for line in res.output.splitlines()) <= 80
    # pictures: feature sheets (photo | teacher | student, PCA-RGB), loss curves from metrics.jsonl, fidelity
    lines = [{"global_step": i, "epoch": 0, "cradio/mobilenet_v2/spatial": 1.0 / (i + 1)} for i in range(30)]
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    pics = tmp_path / "pics"
    res = runner.invoke(
        app, ["eval", run, "--store", store, "--images", "5", "--resolutions", "64", "--pictures", str(pics),
              "--picture-photos", "3", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    written = json.loads(res.stdout)["pictures"]
    assert sorted(Path(p).name for p in written) == [
        "features_effnet_lite0.png", "features_mobilenet_v2.png", "fidelity.png", "losses.png"
    ]  # fmt: skip
    from radio_dist.train.pictures import LABEL, PANEL

    for teacher in ("effnet_lite0", "mobilenet_v2"):
        sheet = np.asarray(Image.open(pics / f"features_{teacher}.png").convert("RGB"))
        assert sheet.shape == (LABEL + 3 * PANEL, 3 * PANEL, 3)  # 3 photos x (photo, teacher, the student)
        for row in range(3):
            y = LABEL + row * PANEL
            photo, feats, student = (sheet[y : y + PANEL, j * PANEL : (j + 1) * PANEL] for j in range(3))
            assert not np.array_equal(photo, feats) and not np.array_equal(feats, student)
            assert feats.std() > 10  # the teacher's features are a picture, not one colour
        rows = [sheet[LABEL + r * PANEL : LABEL + (r + 1) * PANEL, PANEL : 2 * PANEL] for r in range(3)]
        assert not np.array_equal(rows[0], rows[1])  # each photo its own features
    for name in ("fidelity.png", "losses.png"):
        w, h = Image.open(pics / name).size
        assert w >= 400 and h >= 300
    # probes: kNN / logistic regression on summary features, next to the teacher's and raw pixels (digits)
    res = runner.invoke(
        app, ["probe", run, "--store", store, "--dataset", "digits", "--train", "120", "--test", "60", "--px", "64",
              "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["train"], doc["test"], doc["classes"]) == (120, 60, 10)
    assert doc["raw_pixels"]["knn"] > 0.6  # digits are easy from raw pixels (chance: 0.1): the floor is high
    for teacher in ("effnet_lite0", "mobilenet_v2"):
        e = doc["teachers"][teacher]
        assert 0.1 < e["teacher"]["knn"] <= 1 and set(e["students"]) == set(e["untrained"]) == {"cradio"}
        frac = e["fraction_of_teacher"]["cradio"]
        assert frac["knn"] == pytest.approx(e["students"]["cradio"]["knn"] / e["teacher"]["knn"])
    table = runner.invoke(app, ["probe", run, "--store", store, "--dataset", "digits", "--train", "40",
                                "--test", "20", "--px", "64"])  # fmt: skip
    assert table.exit_code == 0 and "raw pixels" in table.output
    assert max(len(line) for line in table.output.splitlines()) <= 80
    # Fashion-MNIST missing: one line naming the Debian package
    res = runner.invoke(app, ["probe", run, "--store", store, "--dataset", "fashion-mnist"],
                        env={"RADIO_DIST_FASHION_MNIST": str(tmp_path / "none")})  # fmt: skip
    assert res.exit_code == 2 and "apt-get install dataset-fashion-mnist" in res.output, res.output


def test_idx_files_read_and_bad_ones_are_named(tmp_path):
    import gzip

    from radio_dist.train.probe import ProbeDataError, read_idx

    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in imgs.shape)
    (tmp_path / "a.gz").write_bytes(gzip.compress(header + imgs.tobytes()))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), imgs)
    (tmp_path / "short").write_bytes(header + imgs.tobytes()[:-3])
    with pytest.raises(ProbeDataError, match="short: truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG....")
    with pytest.raises(ProbeDataError, match="not an IDX file"):
        read_idx(tmp_path / "png")
