"""Students on CPU with tiny configs: shapes, CPE, windowed attention, heads, gradients, export/load."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from radio_dist.phis import Moments, PhiS, fit_phis
from radio_dist.train.students import (
    CPE,
    CRadioBackbone,
    StudentModel,
    StudentSpec,
    TeacherHeadInfo,
    build_student,
    cpe_windows,
    export_student,
    load_student,
    pixel_shuffle_nhwc,
)

TEACHERS = {
    "siglip": TeacherHeadInfo(summary_dim=12, dense_dim=8),
    "dino": TeacherHeadInfo(summary_dim=10, dense_dim=6),
    "sam": TeacherHeadInfo(summary_dim=None, dense_dim=5),
}
SMALL_HEADS = dict(head_hidden=16, head_blocks=1)
SPECS: dict[str, dict[str, Any]] = {
    "cradio": dict(kind="cradio", arch="tiny", num_registers=2, cpe_max_grid=8),
    "vit": dict(kind="timm", arch="vit_tiny_patch16_224", overrides=dict(embed_dim=32, depth=2, num_heads=2)),
    "convnext": dict(
        kind="timm", arch="convnext_atto", overrides=dict(dims=(16, 24, 32, 40), depths=(1, 1, 1, 1))
    ),
}


def make(key: str = "cradio", teachers: dict[str, TeacherHeadInfo] | None = None, **kw) -> StudentModel:
    torch.manual_seed(0)
    spec = StudentSpec.model_validate({"name": key, **SPECS[key], **SMALL_HEADS, **kw})
    return build_student(spec, TEACHERS if teachers is None else teachers)


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# -- shapes -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, patch", [("cradio", 16), ("vit", 16), ("convnext", 32)])
@pytest.mark.parametrize("size", [(64, 64), (64, 128)])
def test_output_shapes(key: str, patch: int, size: tuple[int, int]):
    model = make(key).eval()
    assert model.patch_size == patch
    out = model(images(2, *size))
    gh, gw = size[0] // patch, size[1] // patch
    assert list(out.heads) == sorted(TEACHERS)
    assert out.features.shape[:3] == (2, gh, gw)
    for t, info in TEACHERS.items():
        summary, dense = out.heads[t]
        assert dense.shape == (2, gh, gw, info.dense_dim)
        if info.summary_dim is None:
            assert summary is None
        else:
            assert summary is not None and summary.shape == (2, info.summary_dim)


def test_pixel_shuffle_dense_heads():
    x = torch.randn(2, 3, 4, 5 * 4)  # [B, h, w, C*u*u] with C=5, u=2
    ref = F.pixel_shuffle(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert torch.equal(pixel_shuffle_nhwc(x, 2), ref)
    model = make("cradio", dense_upsample=2).eval()
    out = model(images(1, 48, 80))
    for t, info in TEACHERS.items():
        assert out.heads[t][1].shape == (1, 6, 10, info.dense_dim)
    assert out.features.shape[:3] == (1, 3, 5)


def test_summary_tokens_one_per_teacher_each_read_by_its_head():
    model = make("cradio").eval()
    assert model.teacher_names == ("dino", "sam", "siglip")
    assert model.backbone.summary_tokens.shape == (3, 64)
    assert set(model.summary_heads) == {"dino", "siglip"}  # sam has no summary -> no summary head
    assert set(model.dense_heads) == set(TEACHERS)
    # give two teachers identical summary heads: outputs differ only because they read different tokens
    two = {"a": TeacherHeadInfo(summary_dim=4, dense_dim=3), "b": TeacherHeadInfo(summary_dim=4, dense_dim=3)}
    model = make("cradio", teachers=two).eval()
    model.summary_heads["b"].load_state_dict(model.summary_heads["a"].state_dict())
    out = model(images(1, 32, 32))
    sa, sb = out.heads["a"][0], out.heads["b"][0]
    assert sa is not None and sb is not None and not torch.allclose(sa, sb)
    with torch.no_grad():
        model.backbone.summary_tokens[1] = model.backbone.summary_tokens[0]
    out = model(images(1, 32, 32))
    assert torch.allclose(out.heads["a"][0], out.heads["b"][0], atol=1e-6)  # type: ignore[arg-type]


# -- CPE ----------------------------------------------------------------------------------------------------
def test_cpe_eval_is_deterministic_train_windows_vary():
    model = make("cradio")
    x = images(2, 64, 96)
    model.eval()
    a, b = model(x), model(x)
    assert torch.equal(a.features, b.features)
    model.train()
    c, d = model(x), model(x)
    assert not torch.allclose(c.features, d.features)
    cpe = model.backbone.cpe
    p1, p2 = cpe(4, (5, 7)), cpe(4, (5, 7))
    assert p1.shape == (4, 64, 5, 7)
    assert not torch.allclose(p1, p2)  # between calls
    assert not torch.allclose(p1[0], p1[1])  # between samples of one batch
    scale, offset = cpe.sample_windows(1000)
    side = (scale[:, 0] * scale[:, 1]).sqrt()
    assert scale.max() <= 1 and side.min() >= np.sqrt(0.1) - 1e-6 and (offset + scale).max() <= 1 + 1e-6
    aspect = scale[:, 0] / scale[:, 1]
    assert aspect.min() >= (3 / 4) ** 2 - 1e-6 and aspect.max() <= (4 / 3) ** 2 + 1e-6


def test_cpe_full_window_equals_eval_resize_and_top_left_crop():
    torch.manual_seed(0)
    cpe = CPE(dim=6, max_grid=8).eval()
    ones, zeros = torch.ones(1, 2), torch.zeros(1, 2)
    with torch.no_grad():
        for g in (5, 8, 12):
            full = cpe_windows(cpe.pos_embed, (g, g), ones, zeros)
            torch.testing.assert_close(full, cpe(1, (g, g)), atol=1e-6, rtol=1e-5)
        # eval: the embedding spans the longer side; a shorter side takes the top-left window
        torch.testing.assert_close(cpe(1, (3, 5)), cpe(1, (5, 5))[:, :, :3, :])
        torch.testing.assert_close(cpe(1, (12, 7)), cpe(1, (12, 12))[:, :, :, :7])
        assert torch.equal(cpe(1, (8, 8)), cpe.pos_embed)


def test_cradio_beyond_cpe_max_grid():
    model = make("cradio", cpe_max_grid=4)
    x = images(1, 96, 160)  # 6x10 tokens on a 4x4 embedding grid
    for mode in (False, True):
        out = model.train(mode)(x)
        assert out.features.shape[:3] == (1, 6, 10) and torch.isfinite(out.features).all()


# -- windowed attention -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, window", [((64, 64), 4), ((64, 96), 8)]
)  # one exact window; one padded+masked
def test_window_covering_grid_equals_global(size: tuple[int, int], window: int):
    glob = make("cradio").eval()
    win = make("cradio", window_size=window, global_every=100).eval()
    win.load_state_dict(glob.state_dict())
    assert isinstance(win.backbone, CRadioBackbone) and not any(win.backbone.is_global)
    x = images(2, *size)
    a, b = glob(x), win(x)
    torch.testing.assert_close(b.features, a.features, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.heads["dino"][0], a.heads["dino"][0], atol=1e-5, rtol=1e-4)


def pixel_influence(model: StudentModel, x: torch.Tensor) -> torch.Tensor:
    """Per-patch gradient magnitude of the top-left 2x2 tokens' features w.r.t. the input pixels."""
    x = x.clone().requires_grad_(True)
    model(x).features[:, :2, :2].square().sum().backward()  # (a plain sum of LayerNorm outputs is constant)
    assert x.grad is not None
    return x.grad.abs().sum(dim=(0, 1)).reshape(4, 16, 4, 16).sum(dim=(1, 3))  # [4, 4] token grid


def test_windowed_tokens_do_not_see_other_windows():
    x = images(1, 64, 64)
    glob = make("cradio", overrides={"depth": 1}).eval()
    win = make("cradio", overrides={"depth": 1}, window_size=2, global_every=100).eval()
    win.load_state_dict(glob.state_dict())
    g_win, g_glob = pixel_influence(win, x), pixel_influence(glob, x)
    assert (g_win[:2, :2] > 0).all()
    outside = torch.ones(4, 4, dtype=torch.bool)
    outside[:2, :2] = False
    assert (g_win[outside] == 0).all()  # 4x4 grid, 2x2 windows: tokens outside window 0 have no influence
    assert (g_glob[outside] > 0).all()  # ... whereas global attention mixes everything
    # global_every=2 with 2 blocks: block 0 windowed, block 1 global
    mixed = make("cradio", window_size=2, global_every=2)
    assert mixed.backbone.is_global == [False, True]


# -- gradients ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, kw",
    [("cradio", dict(window_size=2, global_every=2, dense_upsample=2)), ("vit", {}), ("convnext", {})],
)
def test_gradients_reach_every_parameter(key: str, kw: dict):
    model = make(key, **kw).train()
    out = model(images(2, 64, 96))
    loss = sum(d.sum() + (s.sum() if s is not None else 0) for s, d in out.heads.values())
    loss.backward()  # type: ignore[union-attr]
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient (unused in DDP terms): {missing}"


@pytest.mark.parametrize(
    "key, kw", [("cradio", dict(window_size=2, global_every=2)), ("vit", {}), ("convnext", {})]
)
def test_activation_checkpointing_gives_the_same_gradients(key: str, kw: dict):
    """Blocks recomputed in the backward pass (less memory for large students): the same loss and gradients."""
    grads = []
    for ckpt in (False, True):
        model = make(key, activation_checkpointing=ckpt, **kw).eval()  # eval: no drop-path randomness
        with torch.enable_grad():
            out = model(images(2, 64, 64))
            loss = sum(d.square().mean() for _, d in out.heads.values()) + out.features.square().mean()
            loss.backward()  # type: ignore[union-attr]
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)
    model = make(key, activation_checkpointing=True, **kw)
    assert any(getattr(m, "grad_checkpointing", False) for m in model.modules())  # it is switched on


# -- export / load ------------------------------------------------------------------------------------------
def fitted_phis(dim: int, seed: int = 0) -> PhiS:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(scale=3, size=dim)
    return fit_phis(Moments.from_features(feats))


@pytest.mark.parametrize("key", ["cradio", "convnext"])
def test_export_load_round_trip(tmp_path, key: str):
    model = make(key, window_size=2, global_every=2) if key == "cradio" else make(key)
    phis = {"sam": fitted_phis(5)}
    export_student(model, str(tmp_path / "s"), phis=phis, extra={"step": 7})
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["extra"] == {"step": 7} and cfg["teacher_order"] == ["dino", "sam", "siglip"]
    assert (tmp_path / "s" / "phis" / "sam.safetensors").is_file()
    loaded = load_student(str(tmp_path / "s"))
    assert not loaded.training and loaded.train().training is False
    x = images(2, 64, 128)
    ref = model.eval()(x)
    got = loaded(x)
    assert list(got) == sorted(TEACHERS)
    for t, (summary, dense) in ref.heads.items():
        assert torch.equal(got[t]["dense"], dense)  # type: ignore[arg-type]
        assert (got[t]["summary"] is None) == (summary is None)
        if summary is not None:
            assert torch.equal(got[t]["summary"], summary)  # type: ignore[arg-type]
    np.testing.assert_array_equal(loaded.phis["sam"].weight, phis["sam"].weight)


def test_denormalize_uses_phis(tmp_path):
    two = {
        "sam": TeacherHeadInfo(summary_dim=None, dense_dim=5),
        "dino": TeacherHeadInfo(summary_dim=4, dense_dim=6),
    }
    model = make("cradio", teachers=two)
    phis = {"sam": fitted_phis(5, seed=1), "dino": fitted_phis(6, seed=2)}
    export_student(model, str(tmp_path / "full"), phis=phis)
    loaded = load_student(str(tmp_path / "full"))
    x = images(1, 32, 48)
    norm, den = loaded(x), loaded(x, denormalize=True)
    for t in two:
        expected = phis[t].inverse(norm[t]["dense"])  # type: ignore[arg-type]
        torch.testing.assert_close(den[t]["dense"], expected)
        assert not torch.allclose(den[t]["dense"], norm[t]["dense"])  # type: ignore[arg-type]
        assert den[t]["summary"] is None or torch.equal(den[t]["summary"], norm[t]["summary"])  # type: ignore[arg-type]
    export_student(model, str(tmp_path / "partial"), phis={"sam": phis["sam"]})
    with pytest.raises(ValueError, match="dino"):
        load_student(str(tmp_path / "partial"))(x, denormalize=True)
    with pytest.raises(ValueError, match="dim 6"):
        export_student(model, str(tmp_path / "bad"), phis={"sam": phis["dino"]})


def test_uint8_nhwc_equals_float_and_resizes_to_patch_multiple(tmp_path):
    export_student(make("cradio"), str(tmp_path / "s"))
    loaded = load_student(str(tmp_path / "s"))
    u8 = np.random.default_rng(0).integers(0, 256, size=(2, 48, 64, 3), dtype=np.uint8)
    as_float = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    a, b, c = loaded(u8), loaded(torch.from_numpy(u8)), loaded(as_float)
    for t in TEACHERS:
        assert torch.equal(a[t]["dense"], c[t]["dense"]) and torch.equal(b[t]["dense"], c[t]["dense"])  # type: ignore[arg-type]
    odd = loaded(np.zeros((1, 70, 90, 3), dtype=np.uint8))  # -> 64x96 -> 4x6 tokens
    assert odd["dino"]["dense"].shape == (1, 4, 6, 6)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="denormalize"):
        loaded(u8, denormalize=True)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        loaded(u8.transpose(0, 3, 1, 2).copy())


# -- weights ------------------------------------------------------------------------------------------------
def test_backbone_init_from_local_files(tmp_path):
    src = make("vit")
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.backbone.model.state_dict().items()}, str(path))
    torch.manual_seed(123)
    dst = make("vit", weights=str(path))
    for (n, a), b in zip(src.backbone.state_dict().items(), dst.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    cr = make("cradio")
    export_student(cr, str(tmp_path / "cr"))
    torch.manual_seed(123)
    cr2 = make("cradio", weights=str(tmp_path / "cr" / "model.safetensors"))
    for (n, a), b in zip(cr.backbone.state_dict().items(), cr2.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="do not fit"):
        make("cradio", weights=str(tmp_path / "cr" / "model.safetensors"), num_registers=3)
    for key in ("vit", "cradio"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            make(key, weights=str(tmp_path / "missing.safetensors"))


# -- validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(name="bad name!"), "name"),
        (dict(name=""), "name"),
        (dict(patch_size=0), "patch_size"),
        (dict(num_registers=-1), "num_registers"),
        (dict(window_size=0), "window_size"),
        (dict(window_size=4, global_every=0), "global_every"),
        (dict(window_size=4, global_every=1), "global_every"),
        (dict(cpe_max_grid=0), "cpe_max_grid"),
        (dict(head_hidden=0), "head_hidden"),
        (dict(head_blocks=-1), "head_blocks"),
        (dict(dense_upsample=0), "dense_upsample"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
        (dict(arch="giant"), "arch"),
        (dict(overrides={"embed_dims": 32}), "overrides"),
        (dict(overrides={"embed_dim": 30, "num_heads": 4}), "embed_dim"),
        (dict(overrides={"depth": 0}), "depth"),
        (dict(kind="timm", arch="no_such_model_x"), "arch"),
        (dict(kind="timm", arch="convnext_atto", window_size=4), "window_size"),
        (dict(kind="vit"), "kind"),
        (dict(windowsize=4), "windowsize"),
    ],
)
def test_invalid_spec_names_the_field(kw: dict, field: str):
    base = dict(name="s", kind="cradio", arch="tiny")
    with pytest.raises(ValueError, match=field):
        StudentSpec.model_validate({**base, **kw})


def test_invalid_teachers_and_inputs():
    with pytest.raises(ValueError, match="dense_dim"):
        TeacherHeadInfo(summary_dim=4, dense_dim=0)
    with pytest.raises(ValueError, match="summary_dim"):
        TeacherHeadInfo(summary_dim=0, dense_dim=4)
    with pytest.raises(ValueError, match="at least one teacher"):
        make("cradio", teachers={})
    with pytest.raises(ValueError, match="teacher name"):
        make("cradio", teachers={"a.b": TeacherHeadInfo(summary_dim=None, dense_dim=2)})
    model = make("cradio")
    with pytest.raises(ValueError, match="multiple of patch_size 16"):
        model(images(1, 40, 48))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(1, 32, 32, 3))
