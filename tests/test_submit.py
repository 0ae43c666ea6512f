"""`radio-dist submit` against a real Ray head started on loopback (`ray start --head` finding a token, so with
token authentication on, as Ray 2.60 does whenever a token is there), then stopped.

The head gets its own --temp-dir so that nothing else on the machine (the test session's own local Ray)
mistakes it for "the" local cluster, and it runs in its own process group so stopping it stops only it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from radio_dist.cli import app
from radio_dist.store import FeatureStore, verify_store
from radio_dist.train.audit import sample_audit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp = tmp_path_factory.mktemp("rayhead")
    port, dash = free_port(), free_port()
    # every fixed default port of a node is moved to a free one: another Ray instance on this machine (the
    # test session's own, a job's) may hold the defaults, e.g. the dashboard agent's 52365
    agent_ports = [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        )
    ]
    # The head as users get it with a token: Ray 2.60's `ray start` turns token authentication on whenever it
    # finds one (~/.ray/auth_token, RAY_AUTH_TOKEN; checked: without one it stays off). Its token is given
    # (RAY_AUTH_TOKEN) rather than left in the machine's ~/.ray/auth_token, and reaches the client as a file
    # named by RAY_AUTH_TOKEN_PATH below.
    token = secrets.token_hex(32)
    token_file = temp / "auth_token"
    token_file.write_text(token + "\n")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_TOKEN": token,
    }
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block",
            f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
            f"--temp-dir={temp}", *agent_ports,
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    saved = os.environ.get("RAY_AUTH_TOKEN_PATH")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).list_jobs()
                break
            except Exception as e:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray head did not come up at {address}: {e}") from None
                time.sleep(1)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)  # where the client finds it (radio-dist submit)
        yield address
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = saved
        _stop(head)


def _stop(head: subprocess.Popen) -> None:
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def test_submit_validates_before_uploading(tmp_path):
    res = runner.invoke(
        app,
        [
            "submit",
            "distill",
            "--config",
            str(REPO / "jobs/configs/distill_sample.yaml"),
            "--set",
            "train.epoch=3",
        ],
    )
    assert res.exit_code == 2 and "unknown key 'epoch'" in res.output
    res = runner.invoke(
        app, ["submit", "train_everything", "--config", str(REPO / "jobs/configs/distill_sample.yaml")]
    )
    assert res.exit_code == 2 and "unknown job 'train_everything'" in res.output


@pytest.mark.slow  # ~2 min on 2 cores: a cluster start, two job uploads, two jobs
def test_submit_cache_then_distill_jobs(ray_head, tmp_path):
    store = tmp_path / "store"
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "submit", "cache_teachers", "--address", ray_head, "--working-dir", str(REPO),
            "--config", str(REPO / "jobs/configs/cache_sample.yaml"),
            "--set", f"store.url={store}", "--set", "source.views=16", "--set", "phis.fit_images=16",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "SUCCEEDED" in res.stdout
    report = verify_store(FeatureStore(str(store)))
    assert report["ok"], report
    assert len(FeatureStore(str(store)).committed_ids()) == 16

    res = runner.invoke(
        app,
        [
            "submit", "distill", "--address", ray_head, "--working-dir", str(REPO),
            "--config", str(REPO / "jobs/configs/distill_sample.yaml"),
            "--set", f"store.url={store}", "--set", f"out={out}",
            "--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "train.threads=1",
            "--set", 'students=[{"name": "tiny", "kind": "cradio", "arch": "tiny", "head_hidden": 32}]',
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (out / "students" / "tiny" / "model.safetensors").is_file()
    seen = sample_audit(str(out))
    assert set(seen) == {0} and sorted(seen[0].values()) == [1] * 16
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["global_step"] == 2


@pytest.mark.slow
def test_no_token_or_a_wrong_one_is_one_line_saying_where_to_put_it(ray_head, tmp_path, monkeypatch):
    """The head has token authentication on: without the token, or with another one, submit stops before
    uploading anything, naming the cluster and where the token goes."""
    args = ["submit", "distill", "--address", ray_head, "--working-dir", str(REPO)]
    args += ["--config", str(REPO / "jobs/configs/distill_sample.yaml")]
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token here
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert (
        f"the Ray cluster at {ray_head} refused the request: it requires a token and none was found"
        in res.output
    )
    assert "RAY_AUTH_TOKEN" in res.output and "Traceback" not in res.output
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "it rejected the token from RAY_AUTH_TOKEN" in res.output


@pytest.mark.slow
def test_a_failing_job_fails_the_command(ray_head, tmp_path):
    res = runner.invoke(
        app,
        [
            "submit", "distill", "--address", ray_head, "--working-dir", str(REPO),
            "--config", str(REPO / "jobs/configs/distill_sample.yaml"),
            "--set", f"store.url={tmp_path / 'no-store'}", "--set", f"out={tmp_path / 'run'}",
        ],
    )  # fmt: skip
    assert res.exit_code == 1
    assert "FAILED" in res.stdout
    assert "not a radio-dist store" in res.output  # the job's own error, followed from its logs
    assert "error: " in res.output and "Traceback" not in res.output  # one line there too


@pytest.mark.slow  # ~1 min: a small store, one job through Ray's own CLI
def test_the_readme_ray_job_submit_line_works_against_a_token_head(ray_head, tmp_path):
    """The README's `ray job submit` line, as written, against the head with token authentication on: Ray's
    own client sends the token only with RAY_AUTH_MODE=token (it is refused without, as the README says)."""
    from radio_dist.testing import write_synthetic_store

    store, out = tmp_path / "store", tmp_path / "run"
    write_synthetic_store(str(store), [6, 6])
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    readme = (REPO / "README.md").read_text()
    assert "RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \\\n" in readme
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", ".", "--",
        "python", "-m", "jobs.distill", "--config", "jobs/configs/distill_sample.yaml",
        "--set", f"store.url={store}", "--set", f"out={out}", "--set", "train.epochs=1",
        "--set", "train.threads=1",
        "--set", 'students=[{"name": "tiny", "kind": "cradio", "arch": "tiny", "head_hidden": 32}]',
    ]  # fmt: skip
    refused = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "authentication token" in (refused.stdout + refused.stderr)
    done = subprocess.run(
        cmd, cwd=REPO, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (out / "students" / "tiny" / "model.safetensors").is_file()
    assert sorted(sample_audit(str(out))[0].values()) == [1] * 12


def test_submitted_jobs_keep_freed_memory_unless_the_runtime_env_says_otherwise(tmp_path):
    """Every worker of a submitted job gets the allocator settings (Ray Train runs the training loop in a
    thread); a value the user's runtime_env file sets wins."""
    from radio_dist.ray_setup import ALLOCATOR_ENV
    from radio_dist.submit import JobName, build_submission

    cfg = REPO / "jobs/configs/distill_sample.yaml"
    env = build_submission(JobName.distill, cfg, [], REPO, None)["runtime_env"]["env_vars"]
    assert {k: env[k] for k in ALLOCATOR_ENV} == ALLOCATOR_ENV
    mine = tmp_path / "runtime_env.yaml"
    mine.write_text("env_vars: {MALLOC_ARENA_MAX: '4'}\n")
    env = build_submission(JobName.distill, cfg, [], REPO, mine)["runtime_env"]["env_vars"]
    assert (
        env["MALLOC_ARENA_MAX"] == "4"
        and env["MALLOC_TRIM_THRESHOLD_"] == ALLOCATOR_ENV["MALLOC_TRIM_THRESHOLD_"]
    )
