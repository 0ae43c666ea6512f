"""Target codecs: fp16, int8 and nf4 on real PHI-S targets, their fidelity record, reading codes, bad codes, recode.

The fidelity targets are checked on the real MobileNetV2 teacher's PHI-S targets of the bundled photos (not on
Gaussian noise); the stores are real Zarr/Parquet stores written by the same writer a caching job uses.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from radio_dist.cache.config import CacheJobConfig
from radio_dist.config import ConfigError, load_model
from radio_dist.phis import Moments, fit_phis
from radio_dist.sources import SAMPLE_PHOTOS, load_sample_photo
from radio_dist.store import FeatureStore, StoreError, store_info, verify_store
from radio_dist.store.chunks import consolidate
from radio_dist.store.codecs import NBINS, Fidelity, UnknownCodecError, get_codec
from radio_dist.store.recode import parse_codec_choices, recode_store
from radio_dist.teacher import create_teacher, preset_spec
from radio_dist.testing import write_random_store
from radio_dist.train.reader import ShardStream, committed_shards, epoch_plan
from radio_dist.train.transfer import to_device

CODECS = ["fp16", "int8", "nf4"]


@pytest.fixture(scope="module")
def phis_targets() -> torch.Tensor:
    """The real MobileNetV2's dense features of the 13 bundled photos at 448 px (14x14 tokens each, 1280-d),
    in PHI-S space fitted on them."""
    images = np.stack(
        [
            np.asarray(
                Image.fromarray(load_sample_photo(n)).convert("RGB").resize((448, 448), Image.BILINEAR)
            )
            for n in SAMPLE_PHOTOS
        ]
    )
    with torch.inference_mode():
        dense = create_teacher(preset_spec("mobilenet_v2"))(images, resolution=448).dense
    phis = fit_phis(Moments.from_features(dense))
    return torch.as_tensor(phis.forward(dense), dtype=torch.float32)


def test_codecs_meet_their_byte_and_fidelity_targets_on_real_phis_targets(phis_targets):
    y = phis_targets
    kurtosis = float(((y - y.mean()) ** 4).mean() / y.var() ** 2)
    assert kurtosis > 3.5  # heavier tails than a normal distribution: not the easy case
    got = {}
    for name in CODECS:
        codec = get_codec(name)
        codes, scale = codec.encode(y)
        fid = Fidelity.measure(y, codec.decode(codes, scale).float())
        stored = codes.numel() * codes.element_size() + (scale.numel() * 2 if scale is not None else 0)
        ratio = stored / (y.numel() * 2)
        assert ratio == pytest.approx(codec.bytes_per_token(1280) / 2560)
        got[name] = (ratio, fid.cos_mean, fid.cos_quantile(0.01), fid.rel_mse)
    assert got["fp16"][1] > 0.999999
    assert got["int8"][0] <= 0.51 and got["int8"][1] >= 0.9999 and got["int8"][2] >= 0.9998, got["int8"]
    assert got["nf4"][0] <= 0.28 and got["nf4"][1] >= 0.995 and got["nf4"][2] >= 0.993, got["nf4"]
    # each is worse than the one with more bits, and the cosine fits the relative MSE (independent errors)
    assert got["fp16"][3] < got["int8"][3] < got["nf4"][3]
    assert got["nf4"][1] == pytest.approx(1 / np.sqrt(1 + got["nf4"][3]), abs=2e-3)


def test_decoding_is_the_same_on_every_path_and_exact_on_the_codebook():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((3, 4, 5, 128)).astype(np.float32) * 3)
    x[0, 0, 0] = 0  # an all-zero token: no NaN from a zero scale
    for name in [*CODECS, "nf4-g32", "nf4-g128"]:
        codec = get_codec(name)
        codes, scale = codec.encode(x)
        assert (
            tuple(codes.shape[1:]) == codec.code_shape((4, 5, 128))
            and codes.dtype == torch.from_numpy(np.zeros(1, codec.code_dtype)).dtype
        )
        dec = codec.decode(codes, scale).float()
        np_dec = codec.decode_numpy(codes.numpy(), None if scale is None else scale.numpy())
        np.testing.assert_array_equal(dec.numpy(), np_dec)
        assert torch.isfinite(dec).all() and (dec[0, 0, 0] == 0).all()
        again = codec.encode(dec)  # decoded values are codebook points: encoding them again changes nothing
        np.testing.assert_array_equal(codec.decode(*again).float().numpy(), dec.numpy())
    # nf4 packs two codes a byte, the low nibble first
    nf4 = get_codec("nf4")
    levels = torch.tensor([-1.0, 1.0] + [0.0] * 62)[None]
    codes, scale = nf4.encode(levels)
    assert codes[0, 0].item() == 0 | (15 << 4) and scale[0, 0].item() == 1.0


def test_fidelity_merges_exactly_and_reads_the_first_percentile_from_its_histogram():
    rng = np.random.default_rng(1)
    ref = torch.from_numpy(rng.standard_normal((4000, 64)))
    dec = ref + torch.from_numpy(rng.standard_normal((4000, 64)) * np.linspace(0.01, 0.3, 4000)[:, None])
    whole = Fidelity.measure(ref, dec)
    merged = Fidelity.measure(ref[:1500], dec[:1500]).merge(Fidelity.measure(ref[1500:], dec[1500:]))
    assert merged.tokens == whole.tokens == 4000 and (merged.hist == whole.hist).all()
    assert merged.rel_mse == pytest.approx(whole.rel_mse) and merged.cos_mean == pytest.approx(whole.cos_mean)
    again = Fidelity.from_json(json.loads(json.dumps(whole.to_json())))
    assert (again.hist == whole.hist).all() and again.sq_err == whole.sq_err and len(again.hist) == NBINS
    cos = torch.nn.functional.cosine_similarity(ref, dec, dim=-1).numpy()
    exact = float(np.percentile(cos, 1))
    p1 = whole.cos_quantile(0.01)
    assert p1 <= exact + 1e-12 and (1 - p1) < (1 - exact) * 1.05  # conservative, within a bin (2.3%)
    assert whole.cos_mean == pytest.approx(cos.mean())


def test_codec_names_and_channels_are_checked():
    with pytest.raises(UnknownCodecError, match="unknown target codec 'int4'.*fp16, int8, nf4"):
        get_codec("int4")
    with pytest.raises(UnknownCodecError, match="power of two"):
        get_codec("nf4-g48")
    with pytest.raises(
        UnknownCodecError, match="teacher 'x'.*groups of 64 channels, the teacher has 96 — choose nf4-g32"
    ):
        get_codec("nf4").check_dim(96, "teacher 'x'")
    assert get_codec("nf4-g32").bytes_per_token(64) == 32 + 2 * 2


def _cache_cfg(**kw) -> dict:
    return {
        "store": {"url": "/tmp/unused"},
        "pipeline": {"partitions": {"low": 224, "high": 448}},
        **kw,
    }


def test_the_caching_config_names_a_codec_per_teacher_and_partition(tmp_path):
    cfg = CacheJobConfig.model_validate(
        _cache_cfg(codecs={"default": "int8", "mobilenet_v2": {"high": "nf4"}, "effnet_lite0": "fp16"})
    )
    assert cfg.codec_name("mobilenet_v2", "high") == "nf4" and cfg.codec_name("mobilenet_v2", "low") == "int8"
    assert cfg.codec_name("effnet_lite0", "high") == "fp16"
    assert CacheJobConfig.model_validate(_cache_cfg()).codec_name("mobilenet_v2", "low") == "fp16"
    bad = {
        "unknown target codec 'int3'": {"default": "int3"},
        "'dinov3' is not a teacher of this job": {"dinov3": "int8"},
        "partition 'mid' is not one of the job's": {"mobilenet_v2": {"mid": "nf4"}},
    }
    for message, codecs in bad.items():
        path = tmp_path / "job.yaml"
        path.write_text(json.dumps(_cache_cfg(codecs=codecs)))
        with pytest.raises(ConfigError, match=message):
            load_model(CacheJobConfig, path, [])


# -- stores holding codes --------------------------------------------------------------------------------------
def _stream(store: FeatureStore) -> ShardStream:
    shards = committed_shards(store)
    plan = epoch_plan(shards, epoch=0, seed=0, num_workers=1, batch_size=4, shuffle_shards=2)[0]
    return ShardStream(store, plan, ["t1", "t2"], ["low"], lambda step: "low")


@pytest.mark.parametrize("codec", ["int8", "nf4-g32"])
def test_the_reader_hands_over_codes_and_the_device_decodes_them(tmp_path, codec):
    store = FeatureStore(str(tmp_path / "s"))
    write_random_store(store.url, [6, 5], {"t1": (2, 64, 64), "t2": (3, 32, None)}, 32, codec=codec)
    c = get_codec(codec)
    want = {
        (sh.shard, t): store.read_targets(sh.shard, t, "low")[0]
        for sh in committed_shards(store)
        for t in ("t1", "t2")
    }
    by_id = {}
    for sh in committed_shards(store):
        for i, rid in enumerate(sh.ids):
            by_id[rid] = {t: want[(sh.shard, t)][i] for t in ("t1", "t2")}
    seen = 0
    for batch in _stream(store):
        for t, dim in (("t1", 64), ("t2", 32)):
            codes = batch.dense[t]
            assert codes.dtype == c.code_dtype and codes.shape[1:] == c.code_shape(
                (2 if t == "t1" else 3,) * 2 + (dim,)
            )
            assert batch.dense_scale[t].dtype == np.float16  # codes and scales cross as stored
        db = to_device(batch, torch.device("cpu"))
        for k, rid in enumerate(batch.ids):
            for t in ("t1", "t2"):
                np.testing.assert_array_equal(db.dense[t][k].numpy(), by_id[rid][t])
            seen += 1
    assert seen == 11
    info = store_info(store)["teachers"]["t1"]["targets"]["low"]
    assert (
        info["codec"] == codec
        and info["fidelity"]["tokens"] == 11 * 4
        and info["fidelity"]["against"] == "float"
    )
    assert info["vs_fp16"] == pytest.approx(c.bytes_per_token(64) / 128)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_codec_this_version_does_not_know_is_named_and_nothing_changes(tmp_path):
    store = FeatureStore(str(tmp_path / "s"))
    write_random_store(store.url, [4], {"t1": (2, 64, 64), "t2": (2, 64, 64)}, 32, codec="int8")
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    meta["teachers"]["t2"]["codecs"]["low"] = "int3"
    (tmp_path / "s" / "store.json").write_text(json.dumps(meta))
    before = _files(tmp_path / "s")
    shard = committed_shards(store)[0].shard
    message = r"store.json: teacher 't2', partition 'low': unknown target codec 'int3'"
    with pytest.raises(StoreError, match=message):
        _stream(store)
    with pytest.raises(StoreError, match=message):
        store.read_targets(shard, "t2", "low")
    with pytest.raises(StoreError, match=message):
        store_info(store)
    report = verify_store(store)
    assert not report["ok"] and any("unknown target codec 'int3'" in p for p in report["problems"])
    store.read_targets(shard, "t1", "low")  # the teacher whose codec is known still reads
    assert _files(tmp_path / "s") == before


def test_a_truncated_code_chunk_is_named_with_its_shard(tmp_path):
    store = FeatureStore(str(tmp_path / "s"))
    write_random_store(store.url, [4, 4], {"t1": (2, 64, 64), "t2": (2, 64, 64)}, 32, codec="nf4")
    shard = committed_shards(store)[1].shard
    chunk = tmp_path / "s" / "shards" / shard / "t2" / "low" / "dense" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    before = _files(tmp_path / "s")
    with pytest.raises(StoreError, match=f"shard {shard}, array t2/low/dense: chunk 0 holds"):
        store.read_targets(shard, "t2", "low")
    with pytest.raises(StoreError, match=f"shard {shard}, array t2/low/dense"):
        list(_stream(store))
    report = verify_store(store)
    assert not report["ok"] and any(shard in p for p in report["problems"]), report["problems"]
    assert _files(tmp_path / "s") == before


def test_a_scale_array_of_the_wrong_length_is_named_before_training_sees_it(tmp_path):
    store = FeatureStore(str(tmp_path / "s"))
    write_random_store(store.url, [4, 3], {"t1": (2, 64, 64), "t2": (2, 64, 64)}, 32, codec="int8")
    # the 3-row shard's t2 scales lose a row after it was written (the writer refuses to write one like it)
    bad = next(sh.shard for sh in committed_shards(store) if len(sh.ids) == 3)
    group = zarr.open_group(str(tmp_path / "s" / "shards" / bad), mode="a", zarr_format=3)
    scale = np.asarray(group["t2/low/dense_scale"][...])
    del group["t2/low/dense_scale"]
    group.create_array(
        "t2/low/dense_scale", shape=(2, *scale.shape[1:]), dtype=scale.dtype, compressors=None
    )[...] = scale[:2]
    consolidate(zarr.storage.LocalStore(str(tmp_path / "s" / "shards" / bad)))
    before = _files(tmp_path / "s")
    with pytest.raises(
        StoreError, match=rf"shard {bad}.*arrays of different lengths.*'t2/low/dense_scale': 2"
    ):
        list(_stream(store))
    with pytest.raises(  # the row reader compares the arrays' lengths before it reads a row
        StoreError, match=rf"shard {bad}.*arrays of different lengths.*'t2/low/dense_scale': 2"
    ):
        store.read_targets(bad, "t2", "low")
    report = verify_store(store)
    assert any(f"shard {bad}: t2/low/dense_scale has 2 rows" in p for p in report["problems"]), report[
        "problems"
    ]
    assert _files(tmp_path / "s") == before


# -- recode ----------------------------------------------------------------------------------------------------
def test_recode_rewrites_only_the_targets_and_records_their_fidelity(tmp_path):
    src = FeatureStore(str(tmp_path / "src"))
    write_random_store(
        src.url,
        [5, 4, 3],
        {"t1": (2, 64, 64), "t2": (3, 128, None)},
        {"low": 32, "high": 64},
        errors_per_shard=1,
    )
    dst = FeatureStore(str(tmp_path / "dst"))
    choices = parse_codec_choices(["nf4", "t2.high=int8"], src.meta())
    assert choices == {
        ("t1", "low"): "nf4",
        ("t1", "high"): "nf4",
        ("t2", "low"): "nf4",
        ("t2", "high"): "int8",
    }
    summary = recode_store(src, dst, choices)
    assert summary.written == 3 and summary.rows == 12 and summary.bytes_dst < 0.5 * summary.bytes_src
    assert verify_store(dst)["ok"]
    a, b = src.manifest().to_pylist(), dst.manifest().to_pylist()
    keep = ("id", "source", "view", "status", "error", "shard", "index", "geometry")
    assert [{k: r[k] for k in keep} for r in a] == [{k: r[k] for k in keep} for r in b]
    ma, mb = src.meta(), dst.meta()
    for t in ("t1", "t2"):
        assert (
            ma.teachers[t].fingerprint == mb.teachers[t].fingerprint
            and ma.teachers[t].phis == mb.teachers[t].phis
        )
        assert (tmp_path / "src" / "phis" / f"{t}.safetensors").read_bytes() == (
            tmp_path / "dst" / "phis" / f"{t}.safetensors"
        ).read_bytes()
    for sh in committed_shards(src):
        ra, rb = src.read_shard(sh.shard), dst.read_shard(sh.shard)
        for k in ("images/low", "images/high", "t1/low/summary"):
            np.testing.assert_array_equal(ra[k], rb[k])
        for t, p in choices:
            da, db = src.read_targets(sh.shard, t, p)[0], dst.read_targets(sh.shard, t, p)[0]
            cos = torch.nn.functional.cosine_similarity(torch.from_numpy(da), torch.from_numpy(db), dim=-1)
            assert cos.mean() > (0.9999 if choices[(t, p)] == "int8" else 0.993)
    fid = dst.fidelity()
    assert fid["t2/high"][:2] == ("int8", "fp16") and fid["t1/low"][:2] == ("nf4", "fp16")
    assert fid["t1/low"][2].tokens == 9 * 4 and fid["t2/high"][2].cos_mean > 0.9999
    # run again: nothing to do; with other codecs: refused, naming what it was started with
    assert recode_store(src, dst, choices).skipped == 3
    with pytest.raises(StoreError, match="started with the codecs"):
        recode_store(src, dst, parse_codec_choices(["int8"], src.meta()))
    with pytest.raises(StoreError, match="no such target in the store"):
        parse_codec_choices(["t3=int8"], src.meta())


@pytest.mark.slow  # ~15 s: two CLI processes
@pytest.mark.faults
def test_a_recode_killed_midway_resumes_to_the_same_store(tmp_path):
    """SIGKILL a `radio-dist store recode` after its first commits; the rerun finishes the rest, and the store
    equals one recoded in one go (same rows, same checksums)."""
    from faultkit import TALLY

    src = str(tmp_path / "src")
    write_random_store(src, [4] * 32, {"t1": (16, 512, None)}, 32)  # ~1 MB of fp16 targets a shard
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    recode_store(
        FeatureStore(src), FeatureStore(clean), parse_codec_choices(["nf4"], FeatureStore(src).meta())
    )
    cmd = [
        sys.executable,
        "-m",
        "radio_dist.cli",
        "store",
        "recode",
        src,
        killed,
        "--codec",
        "nf4",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = Path(killed) / "manifest"
    deadline = time.time() + 60
    while time.time() < deadline and (not parts.exists() or len(list(parts.glob("*.parquet"))) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("*.parquet")))
    assert 3 <= done < 32, done
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"{done} already in" in again.stdout.replace("\n", " ")

    def rows(url: str) -> list[tuple[str, str, str]]:
        return sorted((r["id"], r["shard"], r["checksum"]) for r in FeatureStore(url).manifest().to_pylist())

    assert rows(killed) == rows(clean) and len(rows(killed)) == 128
    assert verify_store(FeatureStore(killed))["ok"]
    TALLY.record("recode SIGKILL", 1, rows=128, lost=128 - len({r[0] for r in rows(killed)}), duplicated=0)
