"""One student's optimizer step: precision, clipping, the non-finite guard, and DDP over real gloo workers.

Real store batches (``write_synthetic_store``) read by the real reader; the data-parallel test runs two
processes in a real gloo process group (no Ray needed to test the gradient arithmetic).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from faultkit import TALLY
from fixtures import TINY_VIT

from radio_dist.store import StoreConfig
from radio_dist.testing import write_synthetic_store
from radio_dist.train import losses as L
from radio_dist.train.config import DistillConfig, TrainConfig
from radio_dist.train.parallel import load_named_optimizer_state, named_optimizer_state
from radio_dist.train.plan import prepare_run
from radio_dist.train.reader import ShardStream, committed_shards, epoch_plan
from radio_dist.train.sharded import CheckpointContentError, load_sharded, save_sharded, sharded_state
from radio_dist.train.step import NonFiniteError, StudentState, student_step, to_images
from radio_dist.train.students import StudentSpec
from radio_dist.train.transfer import DeviceBatch, to_device

CPU = torch.device("cpu")
SPEC = StudentSpec.model_validate(TINY_VIT)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("step") / "store")
    write_synthetic_store(url, [8, 8])
    return url


def batches(url: str, batch_size: int, train: TrainConfig | None = None):
    job = DistillConfig(
        store=StoreConfig(url=url), out="unused", students=[SPEC], train=train or TrainConfig()
    )
    plan = prepare_run(job)
    from radio_dist.store import FeatureStore

    store = FeatureStore(url)
    wp = epoch_plan(committed_shards(store), 0, 0, 1, batch_size, 2)[0]
    stream = ShardStream(store, wp, plan.teachers, plan.partitions, lambda s: "low")
    return plan, [to_device(b, CPU) for b in stream]


def step(st, db: DeviceBatch, plan, train: TrainConfig, dtype=None, scale=1.0, seed=0):
    images = to_images(db.images, 32)
    rng = np.random.default_rng(seed)
    return student_step(st, images, db, plan, train, rng, train.lr, 0.0, CPU, loss_scale=scale, dtype=dtype)


@pytest.mark.faults
def test_non_finite_targets_skip_the_step_and_too_many_in_a_row_stop_with_a_clear_error(store_url):
    train = TrainConfig(max_nonfinite_steps=3, mesa_weight=0.0, damp_sigma=0.0)
    plan, bs = batches(store_url, 4, train)
    st = StudentState(SPEC, plan.heads, train, CPU)
    good = step(st, bs[0], plan, train)
    assert good.stepped and math.isfinite(good.grad_norm)
    poisoned = copy.copy(bs[1])
    poisoned.dense = {t: v.clone() for t, v in bs[1].dense.items()}
    poisoned.dense["t1"][0, 0, 0, 0] = float("nan")  # one corrupt target value
    before = {k: v.clone() for k, v in st.model.state_dict().items()}
    bad = step(st, poisoned, plan, train)
    assert not bad.stepped and not math.isfinite(bad.grad_norm) and st.skipped == 1
    after = st.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a non-finite step changed the weights"
    assert step(st, bs[2], plan, train).stepped and st.nonfinite_run == 0 and st.skipped == 1
    step(st, poisoned, plan, train)
    step(st, poisoned, plan, train)
    with pytest.raises(NonFiniteError, match=r"student 'vit': 3 steps in a row.*max_nonfinite_steps"):
        step(st, poisoned, plan, train)
    assert st.checkpoint_state()[0]["guard"] == {"nonfinite_run": 3, "skipped": 4}
    TALLY.record("non-finite target in a batch", 4, 0)


def test_gradients_are_clipped_to_the_configured_norm(store_url):
    train = TrainConfig(grad_clip=1e-3, mesa_weight=0.0, damp_sigma=0.0)
    plan, bs = batches(store_url, 4, train)
    st = StudentState(SPEC, plan.heads, train, CPU)
    out = step(st, bs[0], plan, train)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in st.model.parameters()]))
    assert out.grad_norm > 10 * train.grad_clip  # it had something to clip
    assert float(after) == pytest.approx(train.grad_clip, rel=1e-3)


def test_bf16_autocast_trains_with_fp32_master_weights(store_url):
    train = TrainConfig(precision="bf16", lr=1e-3)
    plan, bs = batches(store_url, 4, train)
    st = StudentState(SPEC, plan.heads, train, CPU)
    first = [step(st, bs[i % len(bs)], plan, train, dtype=torch.bfloat16, seed=i) for i in range(6)]
    assert all(o.stepped and math.isfinite(o.parts["total"]) for o in first)
    assert all(p.dtype == torch.float32 for p in st.model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in st.opt.state.values())
    # the forward really ran in bf16: the loss differs from the fp32 one on the same weights and batch
    fresh32 = StudentState(SPEC, plan.heads, train, CPU)
    fresh16 = StudentState(SPEC, plan.heads, train, CPU)
    l32 = step(fresh32, bs[0], plan, train)
    l16 = step(fresh16, bs[0], plan, train, dtype=torch.bfloat16)
    assert l16.parts["total"] != l32.parts["total"]
    assert l16.parts["total"] == pytest.approx(l32.parts["total"], rel=0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, port: int, url: str, queue) -> None:
    """Rank 0 trains on 3 samples, rank 1 on 1 sample, then on nothing (its shards ran out)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        train = TrainConfig(mesa_weight=0.0, damp_sigma=0.0, grad_clip=None)
        plan, bs = batches(url, 4, train)
        torch.manual_seed(rank + 100)  # different local init: DDP must give both rank 0's weights
        st = StudentState(SPEC, plan.heads, train, CPU, distributed=True)
        n_local = {0: 3, 1: 1}[rank]
        mine = local_slice(bs[0], 0, 3) if rank == 0 else local_slice(bs[0], 3, 4)
        step(st, mine, plan, train, scale=2 * n_local / 4)
        grads = {n: p.grad.numpy().copy() for n, p in st.model.named_parameters()}
        empty = local_slice(bs[1], 0, 2) if rank == 0 else local_slice(bs[1], 0, 0)
        step(st, empty, plan, train, scale=2 * len(empty) / 2)
        queue.put((rank, (grads, {k: v.numpy().copy() for k, v in st.model.state_dict().items()})))
    finally:
        dist.destroy_process_group()


def local_slice(db: DeviceBatch, a: int, b: int) -> DeviceBatch:
    host = copy.copy(db.host)
    host.ids = db.host.ids[a:b]
    return DeviceBatch(
        host,
        db.images[a:b],
        {t: v[a:b] for t, v in db.dense.items()},
        {t: (v[a:b] if v is not None else None) for t, v in db.summary.items()},
        0.0,
    )


def test_ddp_over_gloo_equals_one_process_on_the_global_batch(store_url):
    """Uneven batches (3 + 1 samples) and a worker with an empty batch: DDP's averaged step equals a single
    process's step on the whole batch, and both workers end with the same weights."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, store_url, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    train = TrainConfig(mesa_weight=0.0, damp_sigma=0.0, grad_clip=None)
    plan, bs = batches(store_url, 4, train)
    single = StudentState(SPEC, plan.heads, train, CPU)  # seed 0: the weights rank 0 started from
    start = {k: v.clone() for k, v in single.model.state_dict().items()}
    step(single, bs[0], plan, train)
    names = [n for n, _ in single.model.named_parameters()]
    want_g = np.concatenate([p.grad.numpy().ravel() for p in single.model.parameters()])
    for rank in (0, 1):  # the global batch's mean gradient on both workers (up to float summation order)
        g = np.concatenate([got[rank][0][n].ravel() for n in names])
        assert np.linalg.norm(g - want_g) < 1e-4 * np.linalg.norm(want_g)
    step(single, local_slice(bs[1], 0, 2), plan, train)
    want = single.model.state_dict()
    for k in want:
        np.testing.assert_array_equal(got[0][1][k], got[1][1][k])  # the workers' weights are identical
    moved = np.concatenate([(want[k] - start[k]).numpy().ravel() for k in names])
    diff = np.concatenate([got[0][1][k].ravel() - want[k].numpy().ravel() for k in names])
    assert np.linalg.norm(diff) < 1e-2 * np.linalg.norm(moved)  # and those of one process on the whole batch


FSDP_SPEC = SPEC.model_copy(update={"parallel": "fsdp"})


def _fsdp_worker(rank: int, port: int, url: str, ckpt: str, queue) -> None:
    """A sharded (FSDP2) student over 2 gloo workers: 3 + 1 samples, then 2 + 0; then a DAMP step at lr 0;
    then its sharded checkpoint, each worker its shards, loaded into a fresh sharded student on both workers."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        train = TrainConfig(damp_sigma=0.0, grad_clip=None)  # MESA on: the EMA is sharded too
        plan, bs = batches(url, 4, train)
        st = StudentState(FSDP_SPEC, plan.heads, train, CPU, distributed=True)
        assert st.sharded and st.ema is not None
        mine = local_slice(bs[0], 0, 3) if rank == 0 else local_slice(bs[0], 3, 4)
        step(st, mine, plan, train, scale=2 * len(mine) / 4)
        grads = {n: p.grad.full_tensor().numpy().copy() for n, p in st.model.named_parameters()}
        empty = local_slice(bs[1], 0, 2) if rank == 0 else local_slice(bs[1], 0, 0)
        step(st, empty, plan, train, scale=2 * len(empty) / 2)
        weights, ema = st.export_states()
        # DAMP in place at lr 0: the weights must come back bit for bit, the gradient is the noisy one's
        before = {n: p.full_tensor().clone() for n, p in st.model.named_parameters()}
        lr0 = train.model_copy(update={"lr": 0.0, "weight_decay": 0.0})

        def at_lr0(sigma: float) -> tuple[np.ndarray, float]:
            out = student_step(
                st,
                to_images(mine.images, 32),
                mine,
                plan,
                lr0,
                np.random.default_rng(0),
                0.0,
                sigma,
                CPU,
                loss_scale=2 * len(mine) / 4,
            )
            flat = np.concatenate([p.grad.full_tensor().numpy().ravel() for p in st.model.parameters()])
            return flat, out.grad_norm

        clean, _ = at_lr0(0.0)
        noisy, norm = at_lr0(0.5)
        restored = all(torch.equal(before[n], p.full_tensor()) for n, p in st.model.named_parameters())
        # a sharded checkpoint: each worker writes its shards into its own directory (as on two nodes), merged
        # into one as Ray Train merges the workers' checkpoint directories
        state, shards = st.checkpoint_state()
        assert state["format"] == "dcp" and "model" not in state and shards is not None
        save_sharded(shards, f"{ckpt}/rank{rank}/s.dcp")
        if rank == 0:
            torch.save(state, f"{ckpt}/s.pt")
        dist.barrier()
        if rank == 0:
            for r in (0, 1):
                shutil.copytree(f"{ckpt}/rank{r}/s.dcp", f"{ckpt}/s.dcp", dirs_exist_ok=True)
        dist.barrier()
        again = StudentState(FSDP_SPEC, plan.heads, train, CPU, distributed=True)
        again.load_state_dict(torch.load(f"{ckpt}/s.pt", weights_only=True), Path(f"{ckpt}/s.dcp"))
        same = all(
            torch.equal(a.full_tensor(), b.full_tensor())
            for a, b in zip(again.model.parameters(), st.model.parameters(), strict=True)
        )
        same_ema = all(
            torch.equal(a.full_tensor(), b.full_tensor())
            for a, b in zip(again.ema.parameters(), st.ema.parameters(), strict=True)
        )
        same_opt = again.opt.state_dict()["state"].keys() == st.opt.state_dict()["state"].keys() and all(
            torch.equal(a[k].full_tensor(), b[k].full_tensor())
            for a, b in zip(
                again.opt.state_dict()["state"].values(), st.opt.state_dict()["state"].values(), strict=True
            )
            for k in ("exp_avg", "exp_avg_sq")
        )
        result = {
            "grads": grads,
            "weights": {k: v.numpy().copy() for k, v in weights.items()} if rank == 0 else {},
            "ema_keys": sorted(ema) if ema else [],
            "restored": restored,
            "noise_moved_grad": float(np.linalg.norm(noisy - clean) / np.linalg.norm(clean)),
            "norm": norm,
            "reloaded_same": same and same_ema and same_opt,
            "steps": float(next(iter(st.opt.state_dict()["state"].values()))["step"]),
        }
        queue.put((rank, result))
    finally:
        dist.destroy_process_group()


def test_fsdp2_student_over_gloo_equals_one_process_and_checkpoints_sharded(store_url, tmp_path):
    """FSDP2 (``parallel: fsdp``): uneven and empty batches give the global batch's gradient and one
    process's weights; the in-place DAMP step restores the clean weights exactly; the sharded (DCP)
    checkpoint loads back into a sharded student, and into a plain one."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port, ckpt = _free_port(), str(tmp_path / "ckpt")
    procs = [ctx.Process(target=_fsdp_worker, args=(r, port, store_url, ckpt, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    train = TrainConfig(damp_sigma=0.0, grad_clip=None)
    plan, bs = batches(store_url, 4, train)
    single = StudentState(FSDP_SPEC, plan.heads, train, CPU)  # not distributed: a plain module
    assert not single.sharded
    start = {k: v.clone() for k, v in single.model.state_dict().items()}
    step(single, bs[0], plan, train)
    names = [n for n, _ in single.model.named_parameters()]
    want_g = np.concatenate([p.grad.numpy().ravel() for p in single.model.parameters()])
    for rank in (0, 1):
        g = np.concatenate([got[rank]["grads"][n].ravel() for n in names])
        assert np.linalg.norm(g - want_g) < 1e-4 * np.linalg.norm(want_g)
    step(single, local_slice(bs[1], 0, 2), plan, train)
    want = single.model.state_dict()
    moved = np.concatenate([(want[k] - start[k]).numpy().ravel() for k in names])
    diff = np.concatenate([got[0]["weights"][k].ravel() - want[k].numpy().ravel() for k in names])
    assert np.linalg.norm(diff) < 1e-2 * np.linalg.norm(moved)
    assert set(got[0]["ema_keys"]) == set(want)  # the sharded EMA gathers whole too
    for rank in (0, 1):
        assert got[rank]["restored"] and got[rank]["reloaded_same"] and math.isfinite(got[rank]["norm"])
        assert got[rank]["noise_moved_grad"] > 1e-2  # the DAMP noise was really applied
    # the merged directory has both workers' shards, and loads whole into a plain student (a job relaunched
    # on one worker) with the weights FSDP2 gathered and the optimizer's step count
    assert sorted(os.listdir(f"{ckpt}/s.dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    plain = StudentState(FSDP_SPEC, plan.heads, train, CPU)
    plain.load_state_dict(torch.load(f"{ckpt}/s.pt", weights_only=True), Path(f"{ckpt}/s.dcp"))
    for k, v in plain.model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), got[0]["weights"][k])
    assert next(iter(plain.opt.state_dict()["state"].values()))["step"] == got[0]["steps"] == 4


class _Payload:
    """What a tampered checkpoint index would carry: unpickling it would run ``os.system``."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_tampered_sharded_checkpoint_is_refused_not_run(tmp_path, monkeypatch):
    """DCP reads its index with plain pickle: radio-dist checks it first and refuses what it never writes."""
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    tensors, groups = sharded_state(model, opt, None)
    save_sharded(tensors, tmp_path / "ok.dcp")  # without a process group: one writer
    again = torch.nn.Linear(3, 2)
    again_opt = torch.optim.AdamW(again.parameters())
    load_sharded(again, again_opt, None, tmp_path / "ok.dcp", groups)
    assert torch.equal(again.weight, model.weight)
    (tmp_path / "ok.dcp" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointContentError, match=r"ok\.dcp/\.metadata.*names posix\.system"):
        load_sharded(again, again_opt, None, tmp_path / "ok.dcp", groups)
    assert not (tmp_path / "pwned").exists()


def test_optimizer_state_by_name_and_by_position_both_load():
    """Checkpoints keep the optimizer state keyed by parameter names (a relaunch on more workers shards it);
    those written before, keyed by position, still load."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    named = named_optimizer_state(model, opt)
    assert set(named["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for state in (named, opt.state_dict()):
        fresh = copy.deepcopy(model)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
        load_named_optimizer_state(fresh, fresh_opt, state)
        got = fresh_opt.state_dict()["state"]
        for i, want in opt.state_dict()["state"].items():
            assert torch.equal(got[i]["exp_avg"], want["exp_avg"]) and float(got[i]["step"]) == 1


def test_in_place_damp_noise_is_the_same_on_replicas_given_one_seed():
    """A compiled replicated student puts DAMP's noise into its weights in place; DDP averages the gradients
    before ``undo`` scales them, so every replica must draw the same noise from the step's shared seed."""
    a = torch.nn.Linear(6, 5)
    b = copy.deepcopy(a)
    clean = a.weight.detach().clone()
    undo_a = L.damp_in_place(a, 0.3, generator=torch.Generator().manual_seed(7))
    undo_b = L.damp_in_place(b, 0.3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, clean)
    assert torch.equal(a.bias, b.bias)  # 1-d parameters stay clean
    undo_a()
    undo_b()
    assert torch.equal(a.weight, clean) and torch.equal(b.weight, clean)
    c = copy.deepcopy(a)
    L.damp_in_place(c, 0.3, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(c.weight, clean) and not torch.equal(c.weight, b.weight + 0)


@pytest.mark.slow  # ~1-2 min: inductor compiles the student's forward and backward on the CPU
def test_a_compiled_student_steps_as_the_eager_one_and_damp_does_not_recompile(store_url):
    """``students[].compile``: the compiled student's gradient equals the eager one's; with DAMP on, steps at
    one resolution reuse the compiled graph (the noise goes into the weights in place)."""
    import torch._dynamo

    train = TrainConfig(mesa_weight=0.0, damp_sigma=0.0, grad_clip=None)
    plan, bs = batches(store_url, 4, train)
    eager = StudentState(SPEC, plan.heads, train, CPU)
    compiled = StudentState(SPEC.model_copy(update={"compile": True}), plan.heads, train, CPU)
    assert compiled.damp_in_place and not eager.damp_in_place
    step(eager, bs[0], plan, train)
    step(compiled, bs[0], plan, train)
    for (n, p), q in zip(eager.model.named_parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch._dynamo.utils.counters.clear()
    for k in range(3):
        images = to_images(bs[1].images, 32)
        out = student_step(
            compiled, images, bs[1], plan, train, np.random.default_rng(k), 1e-3, 0.2, CPU, noise_seed=k
        )
        assert out.stepped and math.isfinite(out.grad_norm)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # no recompilation


def _compiled_ddp_worker(rank: int, port: int, url: str, queue) -> None:
    """A compiled DDP student with DAMP on: 3 + 1 samples, then 2 + 0 (rank 1's shards ran out)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        train = TrainConfig(mesa_weight=0.0, damp_sigma=0.3, grad_clip=None)
        plan, bs = batches(url, 4, train)
        st = StudentState(SPEC.model_copy(update={"compile": True}), plan.heads, train, CPU, distributed=True)
        torch.manual_seed(rank)  # the workers' global generators need not agree (only the step's seed does)
        firsts = [local_slice(bs[0], 0, 3), local_slice(bs[0], 3, 4)]
        seconds = [local_slice(bs[1], 0, 2), local_slice(bs[1], 0, 0)]
        for k, (mine, n_global) in enumerate([(firsts[rank], 4), (seconds[rank], 2)]):
            rng = np.random.default_rng([k, rank])  # the shifts may differ per worker, the noise may not
            out = student_step(
                st,
                to_images(mine.images, 32),
                mine,
                plan,
                train,
                rng,
                1e-2,
                0.3,
                CPU,
                loss_scale=2 * len(mine) / n_global,
                noise_seed=1000 + k,
            )
            assert out.stepped
        queue.put((rank, {k: v.numpy().copy() for k, v in st.model.state_dict().items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~2 min: two processes compile the student
def test_compiled_ddp_replicas_stay_identical_with_damp_in_place(store_url):
    """DDP averages the gradients at the noisy weights before ``undo`` scales them by the noise: the replicas
    stay equal only if they drew the same noise (the step's shared ``noise_seed``)."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_compiled_ddp_worker, args=(r, port, store_url, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=280) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for k in got[0]:
        np.testing.assert_array_equal(got[0][k], got[1][k], err_msg=k)


def test_angular_summary_loss_is_the_balanced_one_times_each_teachers_dispersion(store_url):
    """`train.summary_loss: angular` (the baseline of `radio-dist experiment summary-loss`) drops the 1/Disp."""
    from radio_dist.train.step import student_losses

    parts = {}
    for kind in ("balanced", "angular"):
        train = TrainConfig(summary_loss=kind, mesa_weight=0.0, damp_sigma=0.0, max_shift=0)
        plan, bs = batches(store_url, 4, train)
        st = StudentState(SPEC, plan.heads, train, CPU)  # same seed: same weights
        images = to_images(bs[0].images, 32)
        parts[kind] = student_losses(st, images, bs[0], plan, train, np.random.default_rng(0), 0.0, CPU)[1]
    checked = 0
    for t, disp in plan.dispersion.items():
        if f"{t}/summary" in parts["balanced"]:
            d = L.effective_dispersion(disp)
            assert d != 1.0  # the test means something: the two losses differ for this teacher
            assert parts["angular"][f"{t}/summary"] == pytest.approx(parts["balanced"][f"{t}/summary"] * d)
            checked += 1
    assert checked >= 1
    assert (
        parts["angular"][f"{next(iter(plan.dispersion))}/spatial"]
        == parts["balanced"][f"{next(iter(plan.dispersion))}/spatial"]
    )
