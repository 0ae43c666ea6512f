"""The engine's layout holds: arrows point down, no import circle, no private name across modules.

Read from the source (every import, also those inside functions) and from fresh interpreters (what importing
one part really pulls in). Run ``python tests/test_layout.py`` to print the module graph these tests check.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("radio_dist", "teachers", "jobs")

# Who may import whom, by the module's room (its sub-package, or the module itself at the engine's top level).
# A room imports only the rooms below it; the ground floor (config) imports nothing of the project.
# The engine's foundation: what the jobs' rooms build on.
FOUNDATION = {
    "radio_dist.config",
    "radio_dist.ray_setup",
    "radio_dist.phis",
    "radio_dist.sources",
    "radio_dist.teacher",
    "radio_dist.store",
    "radio_dist.weights",
}
ALLOWED: dict[str, set[str]] = {
    "radio_dist": set(),
    "radio_dist.config": set(),
    "radio_dist.ray_setup": {"radio_dist.config"},
    "radio_dist.phis": set(),
    "radio_dist.sources": {"radio_dist.config"},
    "radio_dist.weights": set(),
    "radio_dist.teacher": {"radio_dist.config", "radio_dist.ray_setup", "radio_dist.weights"},
    "radio_dist.store": {"radio_dist.config", "radio_dist.phis"},
    "radio_dist.testing": {"radio_dist.phis", "radio_dist.store"},
    # tells any failure in words: knows the errors of the rooms below it (imported when explaining)
    "radio_dist.failures": {
        "radio_dist.config",
        "radio_dist.sources",
        "radio_dist.store",
        "radio_dist.weights",
    },
    "radio_dist.cache": FOUNDATION,
    "radio_dist.train": FOUNDATION,
    # FeatSharp writes no store; its training job runs in the shared Ray Train scaffold (SCAFFOLD below)
    "radio_dist.featsharp": FOUNDATION - {"radio_dist.store"} | {"radio_dist.train"},
    "radio_dist.bench": FOUNDATION | {"radio_dist.testing", "radio_dist.cache", "radio_dist.train"},
    # the bill of a job before it runs: reads the jobs' configs and builds their models on the meta device
    "radio_dist.costs": FOUNDATION | {"radio_dist.cache", "radio_dist.train", "radio_dist.featsharp"},
    "radio_dist.submit": {
        "radio_dist.config",
        "radio_dist.ray_setup",
        "radio_dist.cache",
        "radio_dist.train",
        "radio_dist.featsharp",
    },  # fmt: skip
    "radio_dist.cli": {"*"},  # the top floor
    # the Ray job entrypoints: one floor above the CLI, whose way of telling a failure they share
    "jobs": {
        "radio_dist.config",
        "radio_dist.cache",
        "radio_dist.train",
        "radio_dist.featsharp",
        "radio_dist.cli",
    },
    "teachers": {"radio_dist.teacher", "radio_dist.featsharp", "radio_dist.weights", "teachers"},
}
# The caching-time part of FeatSharp (what a teacher actor loads) knows nothing of training.
CACHING_FEATSHARP = (
    "radio_dist.featsharp.model",
    "radio_dist.featsharp.file",
    "radio_dist.featsharp.adaptation",
)
# What FeatSharp's training job takes from train/: the Ray Train scaffold, none of distillation.
SCAFFOLD = {
    "radio_dist.train.worker",
    "radio_dist.train.driver",
    "radio_dist.train.rundir",
    "radio_dist.train.parallel",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def room(module: str) -> str:
    """The module's room: its sub-package of radio_dist, a top-level engine module, or teachers / jobs."""
    parts = module.split(".")
    if parts[0] != "radio_dist":
        return parts[0]
    if len(parts) == 1:
        return "radio_dist"
    if f"radio_dist.{parts[1]}" in modules() and (ROOT / "radio_dist" / parts[1]).is_dir():
        return f"radio_dist.{parts[1]}"
    return ".".join(parts[:2])


def resolve(name: str) -> str | None:
    """The project module an import names (``a.b.c`` may be module ``a.b`` with attribute ``c``)."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def imports() -> dict[str, list[tuple[str, list[str], int]]]:
    """module -> [(imported project module, names taken from it, line)] over every import statement."""
    out: dict[str, list[tuple[str, list[str], int]]] = {}
    for mod, path in modules().items():
        found: list[tuple[str, list[str], int]] = []
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = resolve(alias.name)
                    if target:
                        found.append((target, [], node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    target = resolve(f"{base}.{alias.name}") or resolve(base)
                    if target:
                        names = [] if target == f"{base}.{alias.name}" else [alias.name]
                        found.append((target, names, node.lineno))
        out[mod] = found
    return out


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imps if t != m} for m, imps in imports().items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read_whole():
    """The reader itself: it finds the project's modules and their imports, lazy ones included."""
    mods = modules()
    assert {
        "radio_dist.cli",
        "radio_dist.store.feature_store",
        "radio_dist.train.distill",
        "teachers.sam3",
    } <= set(mods)
    g = graph()
    assert "radio_dist.store.records" in g["radio_dist.store.feature_store"]
    assert "radio_dist.train.distill" in g["radio_dist.cli.train"]  # an import inside a function counts
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert cycles(graph()) == []


def test_arrows_point_down():
    bad = []
    for mod, imps in imports().items():
        here = room(mod)
        allowed = ALLOWED.get(here)
        assert allowed is not None, f"{mod}: room {here} has no entry in ALLOWED — place it in the layout"
        for target, _, line in imps:
            there = room(target)
            if there == here or "*" in allowed or there in allowed:
                continue
            bad.append(
                f"{modules()[mod].relative_to(ROOT)}:{line}: {mod} ({here}) imports {target} ({there})"
            )
    assert not bad, "imports against the layout:\n" + "\n".join(bad)


def test_the_teacher_contract_and_caching_featsharp_know_no_training():
    g = graph()
    assert g["radio_dist.teacher"] <= {"radio_dist.config", "radio_dist.ray_setup", "radio_dist.weights"}
    for mod in CACHING_FEATSHARP:
        deps = g[mod]
        assert not {d for d in deps if d.startswith(("radio_dist.train", "radio_dist.cache"))}, (mod, deps)
        assert not deps & {
            "radio_dist.featsharp.train",
            "radio_dist.featsharp.views",
            "radio_dist.featsharp.report",
        }
    for mod in modules():
        if mod.startswith("radio_dist.featsharp"):
            taken = {d for d in g[mod] if d.startswith("radio_dist.train")}
            assert taken <= SCAFFOLD, (mod, taken - SCAFFOLD)
    # the engine never imports a concrete teacher family
    assert not [
        (m, d) for m, ds in g.items() if m.startswith("radio_dist") for d in ds if d.startswith("teachers")
    ]


def test_no_private_name_is_used_across_modules():
    bad = []
    for mod, imps in imports().items():
        for target, names, line in imps:
            bad += [f"{mod}:{line} takes {n} from {target}" for n in names if n.startswith("_")]
    for mod, path in modules().items():  # module._name through an imported project module
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname or a.name: a.name for a in node.names if resolve(a.name)})
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in modules():
                        aliases[a.asname or a.name] = full
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{mod}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def pulled_in(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240, check=True, cwd=ROOT
    )
    return set(res.stdout.split())


def test_a_teacher_actor_imports_only_what_caching_needs():
    """What a Ray Data teacher actor loads: the stage module, the teacher registry with its plugins, the store;
    no trainer, no FeatSharp training job, no Ray Train."""
    mods = pulled_in(
        "from radio_dist.cache.stages import TeacherStage\n"
        "from radio_dist.teacher import preset_spec\n"
        "TeacherStage(preset_spec('dinov3_tiny'), {'low': 64}, None)"
    )
    assert {"radio_dist.cache.stages", "radio_dist.store", "teachers.dinov3"} <= mods
    assert "radio_dist.featsharp.adaptation" in mods  # adaptations register with the plugins
    leaked = sorted(
        m
        for m in mods
        if m.startswith(("radio_dist.train", "radio_dist.bench", "radio_dist.cli", "ray.train"))
        or m in {"radio_dist.featsharp.train", "radio_dist.featsharp.views", "radio_dist.featsharp.report"}
    )
    assert leaked == []


@pytest.mark.parametrize(
    "module, forbidden",
    [
        (
            "radio_dist.store",
            ("radio_dist.cache", "radio_dist.train", "radio_dist.featsharp", "teachers", "ray"),
        ),
        ("radio_dist.train.distill", ("radio_dist.cache", "radio_dist.featsharp", "radio_dist.bench", "ray")),
        (
            "radio_dist.featsharp.train",
            ("radio_dist.cache", "radio_dist.bench", "radio_dist.train.distill", "ray"),
        ),
    ],
)
def test_a_package_alone_pulls_in_only_what_lies_below_it(module, forbidden):
    """Training does not import the caching module (not even to start Ray), the store knows no job; Ray
    itself is imported only when a job starts it."""
    mods = pulled_in(f"import {module}")
    assert module in mods
    assert sorted(m for m in mods if m.split(".")[0] in forbidden or m.startswith(forbidden)) == []


if __name__ == "__main__":  # print the graph, room by room
    for mod, deps in sorted(graph().items()):
        print(f"{mod} ({room(mod)})")
        for d in sorted(deps):
            print(f"    -> {d}")
