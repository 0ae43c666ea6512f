"""End to end with real teachers on real photos: cache -> distill (Ray Train) -> eval on held-out photos.

A short CPU run must give a student far above an untrained one and above the store-mean predictor, with no
collapse at resolutions away from the one it trained on most (the mode-switching failure).
"""

from __future__ import annotations

import pytest

from radio_dist.cache.config import CacheJobConfig
from radio_dist.cache.pipeline import run_cache
from radio_dist.sources import SourceConfig
from radio_dist.store import FeatureStore
from radio_dist.train.config import DistillConfig
from radio_dist.train.distill import run_distill
from radio_dist.train.evaluate import EvalConfig, evaluate, load_students


@pytest.mark.slow  # ~2 min: the end-to-end quality run (cache 128 views, 64 steps, eval); CI runs it
@pytest.mark.timeout(600)
def test_short_run_learns_and_holds_across_resolutions(ray_local, tmp_path):
    store_url = str(tmp_path / "store")
    cache = CacheJobConfig.model_validate(
        {
            "source": {"kind": "sample-photos", "views": 128},
            "store": {"url": store_url, "shard_size": 64},
            "phis": {"fit_images": 64},
        }
    )
    summary = run_cache(cache)
    assert summary.ok == 128
    out = tmp_path / "run"
    cfg = DistillConfig.model_validate(
        {
            "store": {"url": store_url},
            "out": str(out),
            "students": [
                {
                    "name": "cradio",
                    "kind": "cradio",
                    "arch": "tiny",
                    "overrides": {"embed_dim": 128, "depth": 4, "num_heads": 2},
                    "head_hidden": 256,
                }
            ],
            # 224 px is the most-trained resolution; 128/160 are seen less often
            "train": {
                "epochs": 8,
                "batch_size": 16,
                "lr": 0.002,
                "resolutions": {"low": [224, 224, 224, 128, 160]},
                "checkpoint_every": 0,
                "threads": 2,
            },
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        }
    )
    run_distill(cfg)
    result = evaluate(
        FeatureStore(store_url),
        load_students([str(out / "students" / "cradio")]),
        EvalConfig(source=SourceConfig(views=160), images=16, resolutions=[128, 224, 320]),
    )
    assert result["images"] == 16
    for teacher in ("effnet_lite0", "mobilenet_v2"):
        trained = result["students"]["cradio"][teacher]
        floor = result["untrained"]["cradio"][teacher]
        mean = result["mean_predictor"]["mean"][teacher]["224"]
        print(teacher, {r: {k: round(v, 3) for k, v in m.items()} for r, m in trained.items()}, "mean", mean)
        for r in ("128", "224", "320"):
            assert trained[r]["summary_cos"] > floor[r]["summary_cos"] + 0.3
            assert trained[r]["dense_cos"] > floor[r]["dense_cos"] + 0.15
            assert trained[r]["dense_cos"] > mean["dense_cos"] + 0.05  # learned the images, not the average
        dense = [trained[r]["dense_cos"] for r in ("128", "224", "320")]
        assert min(dense) > 0.8 * max(dense), f"{teacher}: fidelity collapses away from 224 px: {dense}"
