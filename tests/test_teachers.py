"""Teacher contract: registry, real offline weights, the timm adapter with a local weights file, fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from radio_dist.sources import load_sample_photo
from radio_dist.teacher import (
    TeacherSpec,
    WeightsSpec,
    create_teacher,
    fingerprint,
    preset_spec,
    register_teacher,
    registered_teachers,
)


def photo_batch(size: int = 224) -> np.ndarray:
    names = ["chelsea", "coffee"]
    return np.stack(
        [np.asarray(Image.fromarray(load_sample_photo(n)).resize((size, size), Image.BICUBIC)) for n in names]
    )


def test_registry_lists_families_and_refuses_duplicates():
    entries = registered_teachers()
    assert {"efficientnet_lite0", "mobilenet_v2", "timm"} <= set(entries)
    with pytest.raises(ValueError, match="already registered"):
        register_teacher("timm", description="again")(entries["timm"].factory)
    with pytest.raises(KeyError, match="unknown teacher family 'nope'"):
        create_teacher(TeacherSpec(name="x", family="nope"))


@pytest.mark.parametrize("family", ["efficientnet_lite0", "mobilenet_v2"])
def test_real_imagenet_teachers(family):
    """The packaged weights are really loaded: the cat photo is classified as a cat (ImageNet 281-285)."""
    teacher = create_teacher(preset_spec(family))
    out = teacher(photo_batch())
    assert out.dense.shape == (2, 7, 7, 1280) and out.summary.shape == (2, 1280)
    torch.testing.assert_close(out.summary, out.dense.mean(dim=(1, 2)))
    logits = teacher.model.classifier(out.summary)
    assert 281 <= int(logits[0].argmax()) <= 285
    assert teacher.forward_calls == 1 and teacher.forward_images == 2
    out384 = teacher(photo_batch(), resolution=384)  # resized inside the teacher
    assert out384.dense.shape == (2, 12, 12, 1280)


def test_bad_input_shape_is_refused():
    teacher = create_teacher(preset_spec("mobilenet_v2"))
    with pytest.raises(ValueError, match="uint8 NHWC"):
        teacher(np.zeros((1, 3, 32, 32), np.float32))


def tiny_vit_spec(**kw) -> TeacherSpec:
    return TeacherSpec(
        name="vit",
        family="timm",
        arch="vit_tiny_patch16_224",
        summary="cls",
        options={"img_size": 64, "depth": 2, "reg_tokens": 2, "no_embed_class": True},
        **kw,
    )


def test_timm_adapter_with_local_weights_file(tmp_path):
    random_init = create_teacher(tiny_vit_spec(weights=WeightsSpec(kind="none", seed=3)))
    path = tmp_path / "vit.pth"
    torch.save(random_init.model.state_dict(), path)
    from_file = create_teacher(tiny_vit_spec(weights=WeightsSpec(kind="file", path=str(path))))
    x = photo_batch(64)
    a, b = random_init(x), from_file(x)
    assert a.dense.shape == (2, 4, 4, 192)  # CLS + 2 registers dropped, 64/16 = 4
    torch.testing.assert_close(a.dense, b.dense)
    torch.testing.assert_close(a.summary, b.summary)
    # seeded random init is identical in every process/actor
    again = create_teacher(tiny_vit_spec(weights=WeightsSpec(kind="none", seed=3)))
    torch.testing.assert_close(again(x).dense, a.dense)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_teacher(tiny_vit_spec(weights=WeightsSpec(kind="file", path=str(tmp_path / "missing.pth"))))


def test_fingerprint_covers_spec_and_weights(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(3)}, path)
    spec = tiny_vit_spec(weights=WeightsSpec(kind="file", path=str(path)))
    fp = fingerprint(spec)
    assert fp == fingerprint(
        spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"pool_size": 4})})
    )
    torch.save({"a": torch.ones(3)}, path)  # same path, other weights
    assert fingerprint(spec) != fp
    assert fingerprint(spec.model_copy(update={"mean": (0.5, 0.5, 0.5)})) != fingerprint(spec)
    assert fingerprint(preset_spec("efficientnet_lite0")) != fingerprint(preset_spec("mobilenet_v2"))


_FAULTS_IN_A_THREAD = """
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 96 * 2**20  # over a thread arena's 64 MiB heap cap, like a batch's activations
def work(out):
    for i in range(6):
        p = libc.malloc(n)  # glibc's malloc, as torch's CPU allocator uses it (numpy would madvise huge pages)
        ctypes.memset(p, 1, n)
        libc.free(p)
        if i == 0:
            start = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - start)
out = []
t = threading.Thread(target=work, args=(out,)); t.start(); t.join()
print(out[0])
"""


def _faults_in_a_thread(env: dict[str, str]) -> int:
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    res = subprocess.run(
        [sys.executable, "-c", _FAULTS_IN_A_THREAD],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(res.stdout.strip())


def test_actor_allocator_env_keeps_big_blocks_for_a_worker_thread():
    """Ray Data runs an actor's function in a worker thread: with the actors' default environment, freeing and
    re-allocating a block bigger than a thread arena's heap does not page-fault it back in every time (five
    rounds of 96 MiB = ~120k faults without it)."""
    from radio_dist.ray_setup import ALLOCATOR_ENV
    from radio_dist.teacher import TeacherRuntime

    assert TeacherRuntime().env == ALLOCATOR_ENV
    pages = 5 * 96 * 2**20 // 4096
    assert _faults_in_a_thread({}) > pages // 2  # glibc's default: mmap + munmap per block
    thresholds_only = {k: v for k, v in ALLOCATOR_ENV.items() if k != "MALLOC_ARENA_MAX"}
    assert _faults_in_a_thread(thresholds_only) > pages // 2  # the thread's arena ignores the thresholds
    assert _faults_in_a_thread(ALLOCATOR_ENV) < pages // 20


def test_a_recorded_mosaic_spec_is_rebuilt_with_a_batch_it_accepts():
    # a store records a spec without its runtime; SAM3's mosaic (k = 3) refuses the default batch of 16
    from pathlib import Path

    from radio_dist.cache.config import CacheJobConfig
    from radio_dist.config import load_model
    from radio_dist.teacher import TeacherSpec, spec_from_record

    cfg = load_model(CacheJobConfig, Path(__file__).parents[1] / "jobs/configs/cradio_v4_cache.yaml")
    sam3 = next(t for t in cfg.teachers if t.name == "sam3")
    with pytest.raises(ValueError, match="multiple of mosaic_k"):
        TeacherSpec.model_validate(sam3.identity())
    again = spec_from_record(sam3.identity())
    assert again.identity() == sam3.identity() and again.runtime.batch_size == 18
    dino = next(t for t in cfg.teachers if t.name == "dinov3")
    assert spec_from_record(dino.identity()).runtime.batch_size == 16  # the default where it is accepted
    with pytest.raises(ValueError, match="family"):
        spec_from_record({**dino.identity(), "family": None})


@pytest.mark.parametrize(
    ("family", "blocks", "channels"), [("mobilenet_v2", 11, 64), ("efficientnet_lite0", 4, 80)]
)
def test_dense_blocks_takes_an_earlier_stage_at_the_stride_patch_size_names(family, blocks, channels):
    """options.dense_blocks (the demo's teachers): the features after N blocks, stride-16 tokens, pooled
    summary; a patch_size that is not the stage's stride, or N out of range, is one clear error."""
    spec = preset_spec(family).model_copy(update={"options": {"dense_blocks": blocks}, "patch_size": 16})
    teacher = create_teacher(spec)
    out = teacher(photo_batch())
    assert out.dense.shape == (2, 14, 14, channels) and out.summary.shape == (2, channels)
    torch.testing.assert_close(out.summary, out.dense.mean(dim=(1, 2)))
    final = create_teacher(preset_spec(family))(photo_batch())
    assert final.dense.shape[-1] == 1280  # the option is what changed the stage
    assert fingerprint(spec) != fingerprint(preset_spec(family).model_copy(update={"patch_size": 16}))
    with pytest.raises(
        ValueError, match=r"after 11 blocks are at stride 16, but patch_size is 32; set patch_size: 16"
    ):
        create_teacher(preset_spec("mobilenet_v2").model_copy(update={"options": {"dense_blocks": 11}}))
    with pytest.raises(ValueError, match=r"options.dense_blocks must be an int in 1\.\."):
        create_teacher(spec.model_copy(update={"options": {"dense_blocks": 0}}))
