"""The ingest benchmark runs end to end on a small store and reports what the README table needs."""

from __future__ import annotations

from radio_dist.bench import bench_ingest
from radio_dist.students import StudentSpec

TINY = [
    StudentSpec(name="a", kind="cradio", arch="tiny", head_hidden=16, cpe_max_grid=8),
    StudentSpec(
        name="b",
        kind="timm",
        arch="vit_tiny_patch16_224",
        overrides={"embed_dim": 32, "depth": 1, "num_heads": 2},
        head_hidden=16,
    ),
]


def test_bench_ingest_small(tmp_path):
    res = bench_ingest(
        images=96, shard_size=32, batch_size=8, steps=2, students=TINY, workdir=tmp_path, log=print
    )
    assert res["rows"] == 96
    for key in ("ratio", "multi_student_ratio", "multi_student_overhead"):
        assert 0 < res[key] < 10, (key, res[key])
    assert res["reader_samples_per_s"] > 0 and res["raw_samples_per_s"] > 0
    assert set(res["separate_step_s"]) == {"a", "b"}
    # 224 px views + 2 teachers x (7x7x1280 fp16 + 1280 fp32) per sample, as stored; the rest is the padding
    # of each shard's last (partial) Zarr chunk, a few rows per array at 32-row shards
    expected = 224 * 224 * 3 + 2 * (7 * 7 * 1280 * 2 + 1280 * 4)
    assert expected <= res["bytes_per_sample"] < 1.15 * expected
