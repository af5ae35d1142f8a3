"""The server's packages import one way, bottom to top, with no circle (docs/architecture.md).

Every import counts: at the top of a module, inside a function, or only for type checking."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "server"
PREFIX = "sessiongate.server"
# Bottom to top: a module may import its own layer's and the ones below, never one above.
LAYERS = [
    {"errors", "ids", "settings", "logs", "supervisor", "loop_share", "eager"},
    {"sandbox"},
    {"security"},
    {"state"},
    {"agents"},
    {"turns"},
    {"sessions"},
    {"cluster"},
    {"api"},
    {"app", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVER).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PREFIX, *parts))


def imports() -> dict[str, set[str]]:
    """Each server module and the server modules it imports."""
    modules = {module_name(p): p for p in SERVER.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PREFIX):
                for alias in node.names:  # `from pkg import module` names a module
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith(PREFIX)}
        graph[name] = {m for m in found if m != name and m != PREFIX}
    return graph


def layer(module: str) -> int:
    top = module.removeprefix(PREFIX + ".").split(".")[0]
    (index,) = [i for i, names in enumerate(LAYERS) if top in names]
    return index


def test_every_module_has_a_layer() -> None:
    for module in imports():
        if module != PREFIX:
            layer(module)


def test_no_package_imports_one_above_it() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in imports().items()
        if module != PREFIX
        for target in targets
        if layer(target) > layer(module)
    ]
    assert not upward, "imports that run back up:\n" + "\n".join(sorted(upward))


def test_no_import_circles() -> None:
    graph = imports()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_nothing_imports_the_folders_by_their_bare_names() -> None:
    """`server`, `client` and `echo` are folders, installed as sessiongate.server, .client and
    .echo: importing one by its bare name (it works from the checkout's root) would load a
    second copy of every module beside the real one."""
    root = SERVER.parent
    bare: list[str] = []
    for folder in ("server", "client", "echo", "tests", "scripts"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                bare += [
                    f"{path.relative_to(root)}:{node.lineno} {name}"
                    for name in names
                    if name.split(".")[0] in {"server", "client", "echo"}
                ]
    assert not bare, "bare imports:\n" + "\n".join(bare)
