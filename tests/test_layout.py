"""The tree is the architecture: stages import only stages below them, no two modules import each other, and every
module stays near the size the guide asks for (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first: a module may import its own stage and the stages before it, never one after it.
STAGES = [
    ("finetune.errors", "finetune.memory", "finetune.quiet", "data_tools"),
    ("finetune.recipe",),
    ("finetune.moe",),
    ("finetune.distributed",),
    ("finetune.model",),
    ("finetune.plan",),
    ("finetune.export",),
    ("finetune.tracking",),
    ("finetune.evaluate",),
    ("finetune.train",),
    ("finetune.cli", "finetune.cli_data", "finetune.cli_options", "finetune.__main__"),
]
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("finetune", "data_tools") for p in (ROOT / top).rglob("*.py")}


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every project module each module imports, at the top or inside a function (both run eventually)."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` depends on the submodule; `from module import name` on the module
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names
                ]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and target not in ("finetune", "data_tools"):
                    found.add(target)
        graph[name] = found
    return graph


def stage_of(name: str) -> int:
    for index, members in enumerate(STAGES):
        if any(name == m or name.startswith(m + ".") for m in members):
            return index
    raise AssertionError(f"{name} belongs to no stage: add it to STAGES and docs/architecture.md")


def test_every_import_goes_down_the_stages():
    graph = imports(modules())
    upward = [f"{a} -> {b}" for a, bs in graph.items() for b in bs if stage_of(b) > stage_of(a)]
    assert upward == []


def test_no_import_circles():
    graph = imports(modules())
    circles = []

    def visit(node, path):
        for nxt in graph[node]:
            if nxt == path[0]:
                circles.append(" -> ".join([*path, nxt]))
            elif nxt not in path and nxt > path[0]:  # each circle once, from its smallest member
                visit(nxt, [*path, nxt])

    for start in graph:
        visit(start, [start])
    assert circles == []


def test_modules_stay_small():
    sizes = {name: len(p.read_text(encoding="utf-8").splitlines()) for name, p in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
