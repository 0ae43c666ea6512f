"""The C-RADIOv4 seed teachers (DINOv3, SigLIP2, SAM3 + mosaic): tiny random-init configs of the real
architectures, local weights files, spec checks, mosaic tiling and its fidelity, and a two-partition
caching run through the real pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from radio_dist.cache.config import CacheJobConfig
from radio_dist.cache.pipeline import run_cache
from radio_dist.sources import load_sample_photo
from radio_dist.store import FeatureStore, store_info, verify_store
from radio_dist.teacher import (
    TeacherSpec,
    create_teacher,
    fingerprint,
    preset_spec,
    registered_teachers,
)
from teachers.mosaic import mosaic_count, mosaic_k, tile, untile

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "china", "flower", "grace_hopper", "hubble_deep_field"]


def photos(size: int, names: list[str] = PHOTOS) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.fromarray(load_sample_photo(n)).resize((size, size), Image.BICUBIC)) for n in names]
    )


def variant(spec: TeacherSpec, **update) -> TeacherSpec:
    """A copy of ``spec`` re-validated (model_copy alone would skip the spec's checks)."""
    return TeacherSpec.model_validate({**spec.model_dump(mode="json"), **update})


def alone_spec(spec: TeacherSpec) -> TeacherSpec:
    """The same SAM3 (same weights) without mosaic: every image is its own encoder input."""
    opts = {k: v for k, v in spec.options.items() if k != "mosaic_k"}
    return variant(spec, adaptation="none", options=opts)


# ---------------------------------------------------------------------------------------------- mosaic


@pytest.mark.parametrize("k,n", [(1, 3), (2, 4), (2, 5), (3, 7), (3, 18)])
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_tile_untile_round_trip(k, n, backend):
    rng = np.random.default_rng(k * 100 + n)
    x = rng.integers(0, 255, size=(n, 6, 6, 3), dtype=np.uint8)
    xs = torch.from_numpy(x) if backend == "torch" else x
    mosaics, count = tile(xs, k)
    assert count == n and tuple(mosaics.shape) == (mosaic_count(n, k), 6 * k, 6 * k, 3)
    assert type(mosaics) is type(xs) and mosaics.dtype == xs.dtype
    back = np.asarray(untile(mosaics, k, n))
    np.testing.assert_array_equal(back, x)
    # layout: view i of mosaic j sits at row (i // k), column (i % k); the padding is zeros
    i = n - 1
    j, r, c = i // (k * k), (i % (k * k)) // k, i % k
    np.testing.assert_array_equal(np.asarray(mosaics)[j, r * 6 : (r + 1) * 6, c * 6 : (c + 1) * 6], x[i])
    every_tile = np.asarray(untile(mosaics, k, mosaic_count(n, k) * k * k))
    assert not every_tile[n:].any()


def test_tile_untile_refuse_bad_shapes():
    with pytest.raises(ValueError, match="positive integer"):
        tile(np.zeros((2, 4, 4, 3)), 0)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        tile(np.zeros((4, 4, 3)), 2)
    with pytest.raises(ValueError, match="does not split"):
        untile(np.zeros((1, 5, 5, 3)), 2, 1)
    with pytest.raises(ValueError, match="hold at most 4"):
        untile(np.zeros((1, 4, 4, 3)), 2, 5)


# --------------------------------------------------------------------------------------- registry, specs


def test_seed_families_and_tiny_presets_are_registered():
    entries = registered_teachers()
    for family, preset in [("dinov3", "dinov3_tiny"), ("siglip2", "siglip2_tiny"), ("sam3", "sam3_tiny")]:
        assert family in entries and "random-init" in entries[family].description
        spec = preset_spec(preset)  # by preset name ...
        assert spec == preset_spec(family)  # ... or by family name
        assert spec.name == preset and spec.family == family and spec.weights.kind.value == "none"


def test_dinov3_tiny_dense_is_patch_tokens_summary_is_cls():
    teacher = create_teacher(preset_spec("dinov3_tiny"))
    x = photos(64)[:3]
    out = teacher(x)
    assert out.dense.shape == (3, 4, 4, 64) and out.summary.shape == (3, 64)
    xn = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - teacher._mean) / teacher._std
    with torch.no_grad():
        feats = teacher.model.forward_features(xn)  # CLS + 4 registers + 16 patches
    assert feats.shape[1] == 5 + 16
    torch.testing.assert_close(out.summary, feats[:, 0])
    torch.testing.assert_close(out.dense, feats[:, 5:].reshape(3, 4, 4, 64))
    assert teacher(photos(96)[:2]).dense.shape == (2, 6, 6, 64)  # any size (RoPE): partitions differ


def test_siglip2_tiny_summary_is_the_map_head():
    teacher = create_teacher(preset_spec("siglip2_tiny"))
    assert teacher.model.attn_pool is not None and teacher.prefix == 0
    x = photos(64)[:3]
    out = teacher(x)
    assert out.dense.shape == (3, 4, 4, 64) and out.summary.shape == (3, 64)
    with torch.no_grad():
        map_out = teacher.model.attn_pool(out.dense.reshape(3, 16, 64))
    torch.testing.assert_close(out.summary, map_out)
    assert not torch.allclose(out.summary, out.dense.mean(dim=(1, 2)))  # attention pooling, not a mean
    assert teacher(photos(128)[:2]).dense.shape == (2, 8, 8, 64)  # position embedding resampled


@pytest.mark.parametrize("preset", ["dinov3_tiny", "siglip2_tiny", "sam3_tiny"])
def test_weights_file_loads_and_a_wrong_file_is_refused(preset, tmp_path):
    from safetensors.torch import save_file

    spec = variant(preset_spec(preset), weights={"kind": "none", "seed": 3})
    random_init = create_teacher(spec)
    path = tmp_path / "w.safetensors"
    save_file(random_init.model.state_dict(), str(path))
    from_file = create_teacher(variant(spec, weights={"kind": "file", "path": str(path)}))
    x = photos(112 if preset == "sam3_tiny" else 64)[:2]
    a, b = random_init(x), from_file(x)
    torch.testing.assert_close(a.dense, b.dense)
    assert not torch.allclose(a.dense, create_teacher(preset_spec(preset))(x).dense)  # seed 3 != seed 0
    deeper = variant(spec, weights={"kind": "file", "path": str(path)}, options={**spec.options, "depth": 5})
    with pytest.raises(ValueError, match="does not fit timm"):
        create_teacher(deeper)


def test_spec_geometry_and_choices_are_checked():
    dino = preset_spec("dinov3_tiny")
    with pytest.raises(ValueError, match="patch_size=14 but .* has patch 16"):
        create_teacher(variant(dino, patch_size=14))
    with pytest.raises(ValueError, match="num_prefix_tokens=1 but .* has 5 prefix tokens"):
        create_teacher(variant(dino, num_prefix_tokens=1))
    with pytest.raises(ValueError, match="needs `arch`"):
        create_teacher(variant(dino, arch="vit_base_patch16_siglip_224"))
    with pytest.raises(ValueError, match="summary 'cls' is not available"):
        create_teacher(variant(preset_spec("siglip2_tiny"), summary="cls"))
    with pytest.raises(ValueError, match="adaptation 'mosaic' is not implemented"):  # SAM3's, not SigLIP2's
        create_teacher(
            variant(preset_spec("siglip2_tiny"), adaptation="mosaic", options={"mosaic_k": 2, "img_size": 64})
        )
    # featsharp is any family's adaptation, given a file
    with pytest.raises(ValueError, match="adaptation=featsharp needs options.featsharp"):
        create_teacher(variant(preset_spec("siglip2_tiny"), adaptation="featsharp"))
    with pytest.raises(ValueError, match="dynamic_img_size=False is not supported"):
        create_teacher(variant(dino, options={**dino.options, "dynamic_img_size": False}))


def test_mosaic_spec_checks_and_fingerprint_covers_k():
    sam = preset_spec("sam3_tiny")
    assert mosaic_k(sam) == 2 and mosaic_k(alone_spec(sam)) is None
    assert sam.without_adaptation() == alone_spec(sam)  # the contract's plain copy: same as by hand
    k4 = variant(sam, options={**sam.options, "mosaic_k": 4})  # batch 16 = 4**2: valid
    assert fingerprint(k4) != fingerprint(sam)
    assert fingerprint(alone_spec(sam)) != fingerprint(sam)
    assert fingerprint(variant(sam)) == fingerprint(sam)
    with pytest.raises(ValueError, match="needs options.mosaic_k"):
        variant(sam, options={k: v for k, v in sam.options.items() if k != "mosaic_k"})
    with pytest.raises(ValueError, match="not a multiple of mosaic_k\\*\\*2 = 9"):
        variant(sam, options={**sam.options, "mosaic_k": 3})  # runtime.batch_size 16
    with pytest.raises(ValueError, match="mosaic_k is set but adaptation is 'none'"):
        variant(sam, adaptation="none")
    with pytest.raises(ValueError, match="options.featsharp is set but adaptation is 'mosaic'"):
        variant(sam, options={**sam.options, "featsharp": "f.safetensors"})
    with pytest.raises(ValueError, match="unknown adaptation 'mosaik'; use one of none, featsharp, mosaic"):
        variant(sam, adaptation="mosaik")


# ------------------------------------------------------------------------------------------- SAM3


def unit_variance_blocks(teacher, seed: int = 1) -> None:
    """Re-draw the blocks' weights with std 1/sqrt(fan_in) (and a strong position embedding).

    timm's init (std 0.02, depth-scaled projections) leaves random blocks close to the identity, so any
    mosaic would look exact; at unit variance every block changes the tokens as much as they carry, and
    the global block's cross-tile attention shows at full strength.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in teacher.model.named_parameters():
            if name.startswith("blocks.") and p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif name == "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_sam3_tiny_shapes_and_input_sizes():
    teacher = create_teacher(preset_spec("sam3_tiny"))
    assert (teacher.native, teacher.tile_px, teacher.k, teacher.window) == (112, 56, 2, 4)
    out = teacher(photos(112)[:3])
    assert out.summary is None and out.dense.shape == (3, 8, 8, 64)  # native: 8x8 tokens
    assert teacher.model_inputs == 3
    with pytest.raises(ValueError, match="must be 56 px .* or 112 px"):
        teacher(photos(64)[:2])
    pooled = create_teacher(variant(alone_spec(preset_spec("sam3_tiny")), summary="pooled"))
    out = pooled(photos(70)[:2])  # without mosaic any size runs (70 px -> 5x5, windows padded)
    assert out.dense.shape == (2, 5, 5, 64)
    torch.testing.assert_close(out.summary, out.dense.mean(dim=(1, 2)))


def test_sam3_mosaic_is_exact_when_no_block_attends_globally():
    """Windows = tiles and a tiled position embedding: without global blocks the mosaic changes nothing."""
    spec = preset_spec("sam3_tiny")
    spec = variant(spec, options={**spec.options, "global_blocks": []})
    mosaic, alone = create_teacher(spec), create_teacher(alone_spec(spec))
    unit_variance_blocks(mosaic)
    unit_variance_blocks(alone)
    x = photos(56)[:5]
    torch.testing.assert_close(mosaic(x).dense, alone(x).dense, rtol=1e-4, atol=1e-4)


def test_sam3_mosaic_matches_each_image_alone_and_counts_forwards():
    """k=2 mosaic of 56 px views in the 112 px native input vs each view encoded alone at 56 px.

    Tolerance: relative L2 error <= 0.3 per image, and at most 0.6x the distance to any *other* image's
    alone-result. Only the global block (the last of 4, as SAM3's last block is global) can differ: it
    attends across tiles and sees RoPE positions scaled by 1/k. With unit-variance random blocks this
    measured 0.08-0.22 (about 0.015-0.045 of it from the RoPE scale, the rest cross-tile attention); with
    timm's own init it is <= 0.008. A wrong tile order or window alignment gives errors >= 0.36 here.
    """
    spec = preset_spec("sam3_tiny")
    mosaic, alone = create_teacher(spec), create_teacher(alone_spec(spec))
    unit_variance_blocks(mosaic)
    unit_variance_blocks(alone)
    x = photos(56)  # 8 views -> 2 mosaics
    m, a = mosaic(x).dense, alone(x).dense
    n = len(x)
    own = [rel_err(m[i], a[i]) for i in range(n)]
    nearest_other = [min(rel_err(m[i], a[j]) for j in range(n) if j != i) for i in range(n)]
    assert max(own) <= 0.3, own
    assert all(o <= 0.6 * c for o, c in zip(own, nearest_other, strict=True)), (own, nearest_other)
    assert mosaic.model_inputs == mosaic_count(n, 2) == 2 and mosaic.forward_images == n
    assert alone.model_inputs == n
    # N not a multiple of k^2: the last mosaic is padded, still ceil(N / k^2) encoder inputs
    before = mosaic.model_inputs
    out5 = mosaic(x[:5]).dense
    assert mosaic.model_inputs - before == 2 and out5.shape == (5, 4, 4, 64)
    torch.testing.assert_close(out5[:4], m[:4])  # the first mosaic holds the same 4 views


def test_sam3_rope_is_sams_complex_axial_rope_in_timm_layout():
    """timm's sin/cos rotation with ``axial_rope`` == SAM3's formulation: channel pairs as complex numbers
    times exp(i * angle), angles = (column freqs, then row freqs) * position * scale."""
    from timm.layers import apply_rot_embed_cat

    from teachers.sam3 import axial_rope

    h, w, d, scale = 3, 5, 16, 24 / 72
    q = torch.randn(2, 1, h * w, d)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, d, 4)[: d // 4].float() / d))
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    angles = torch.cat(
        [cols.reshape(-1, 1).float() * scale * freqs, rows.reshape(-1, 1).float() * scale * freqs], dim=-1
    )
    expected = torch.view_as_real(
        torch.view_as_complex(q.reshape(2, 1, h * w, d // 2, 2))
        * torch.polar(torch.ones_like(angles), angles)
    ).flatten(3)
    torch.testing.assert_close(apply_rot_embed_cat(q, axial_rope(h, w, d, scale, q.device)), expected)


def test_sam3_checkpoint_conversion(tmp_path):
    """A SAM3-layout checkpoint (detector + tracker keys, ln_pre, CLS + 4x4 position table, RoPE buffers)
    converts with ``python -m teachers.sam3 convert`` and loads as a weights file with the same outputs."""
    from teachers.sam3 import main

    spec = preset_spec("sam3_tiny")
    ref = create_teacher(spec)
    unit_variance_blocks(ref)
    sd = ref.model.state_dict()
    pre = "detector.backbone.vision_backbone.trunk."
    sam3_sd = {pre + k.replace("norm_pre.", "ln_pre."): v for k, v in sd.items() if k != "pos_embed"}
    window = sd["pos_embed"].reshape(8, 8, -1)[:4, :4].reshape(1, 16, -1)
    sam3_sd[pre + "pos_embed"] = torch.cat([torch.randn(1, 1, 64), window], dim=1)  # CLS position first
    sam3_sd[pre + "blocks.0.attn.freqs_cis"] = torch.zeros(16, 8, dtype=torch.complex64)
    sam3_sd["detector.transformer.decoder.query_embed.weight"] = torch.zeros(3, 3)  # not the encoder
    sam3_sd["tracker.sam_prompt_encoder.trunk.patch_embed.proj.weight"] = torch.zeros(1)  # another trunk
    torch.save({"model": sam3_sd}, tmp_path / "sam3.pt")
    main(["convert", str(tmp_path / "sam3.pt"), str(tmp_path / "enc.safetensors"), "--native-grid", "8"])
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "enc.safetensors"))) == set(sd)
    loaded = create_teacher(
        variant(spec, weights={"kind": "file", "path": str(tmp_path / "enc.safetensors")})
    )
    x = photos(56)[:4]
    torch.testing.assert_close(loaded(x).dense, ref(x).dense)


# ------------------------------------------------------------------------------ pipeline, two partitions


def test_cache_two_partitions_with_dinov3_and_sam3_mosaic(tmp_path, ray_local):
    dino, sam = preset_spec("dinov3_tiny"), preset_spec("sam3_tiny")
    for s in (dino, sam):
        s.runtime.batch_size = 8  # a multiple of k^2 = 4: whole mosaics
    cfg = CacheJobConfig.model_validate(
        {
            "source": {"kind": "sample-photos", "views": 8},
            "teachers": [dino.model_dump(mode="json"), sam.model_dump(mode="json")],
            "store": {"url": str(tmp_path / "store"), "shard_size": 4},
            "pipeline": {"partitions": {"low": 64, "high": 128}},
            "phis": {"fit_images": 8},
        }
    )
    summary = run_cache(cfg)
    assert summary.ok == 8 and summary.error == 0
    store = FeatureStore(cfg.store.url)
    assert verify_store(store)["ok"]
    outputs = store_info(store)["teachers"]
    # the store records which grid each array holds: dinov3 at 64/128 px (patch 16), SAM3 at 56/112 px
    # (patch 14, resized from the 64/128 px views by the spec's resolution)
    assert outputs["dinov3_tiny"]["outputs"] == {
        "low": {"dense": [4, 4, 64], "summary": [64]},
        "high": {"dense": [8, 8, 64], "summary": [64]},
    }
    assert outputs["sam3_tiny"]["outputs"] == {
        "low": {"dense": [4, 4, 64], "summary": None},
        "high": {"dense": [8, 8, 64], "summary": None},
    }
    # teacher forwards: once per image per partition; SAM3's low partition as ceil(8 / 2^2) = 2 mosaics
    assert summary.teacher_forwards["dinov3_tiny"]["images"] == 16
    assert summary.teacher_forwards["sam3_tiny"]["images"] == 16
    assert summary.teacher_inputs == {
        "dinov3_tiny": {"low": 8, "high": 8},
        "sam3_tiny": {"low": 2, "high": 8},
    }
    # stored SAM3 low targets (teacher space) are each image's own: close to that image encoded alone
    alone = create_teacher(alone_spec(sam))
    for shard in sorted({r["shard"] for r in store.manifest().to_pylist()}):
        images = store.read_shard(shard)["images/low"]
        dense, _ = store.read_targets(shard, "sam3_tiny", "low", space="teacher")
        ref = alone(images, resolution=56).dense
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(dense), ref, dim=-1)
        assert cos.min() > 0.99, cos.min()
