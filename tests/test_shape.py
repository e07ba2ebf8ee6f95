"""The package's shape: short functions, short modules, no import cycles, one list of choices.

The checks mirror the project's shape tool: functions over 100 lines, modules over 800 lines,
and cycles between ``distnoisy`` modules, counting imports inside functions (a module importing
its own enclosing package's ``__init__`` does not count).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "distnoisy"
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 800

# Known offenders, "path:function" or "path", each with the reason it may stay (none today).
KNOWN: set[str] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def _imports(name: str, path: Path, tree: ast.AST, mods: dict[str, Path]) -> set[str]:
    """The distnoisy modules that ``name`` imports anywhere in its body."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            for alias in node.names:
                for cand in (f"{base}.{alias.name}", base):
                    if cand in mods and cand != name:
                        out.add(cand)
                        break
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in mods and a.name != name)
    # Importing one's own enclosing package is how Python imports a submodule anyway.
    return {m for m in out if not name.startswith(m + ".")}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _parsed() -> dict[str, tuple[Path, str, ast.AST]]:
    out = {}
    for name, path in _modules().items():
        src = path.read_text()
        out[name] = (path, src, ast.parse(src))
    return out


def test_no_function_over_100_lines():
    long = []
    for path, _, tree in _parsed().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                key = f"{_rel(path)}:{node.name}"
                if lines > MAX_FUNCTION_LINES and key not in KNOWN:
                    long.append(f"{key} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_module_over_800_lines():
    long = [
        f"{_rel(path)} ({len(src.splitlines())} lines)"
        for path, src, _ in _parsed().values()
        if len(src.splitlines()) > MAX_MODULE_LINES and _rel(path) not in KNOWN
    ]
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_import_cycle():
    parsed = _parsed()
    mods = {name: path for name, (path, _, _) in parsed.items()}
    edges = {name: _imports(name, path, tree, mods) for name, (path, _, tree) in parsed.items()}
    assert not _cycles(edges), f"import cycles: {_cycles(edges)}"


def test_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_config_imports_neither_torch_nor_the_methods():
    code = (
        "import sys, distnoisy.config; "
        "bad = [m for m in ('torch', 'numpy', 'distnoisy.methods') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


def test_lists_of_choices_match_their_registries():
    from distnoisy.core.choices import DATASETS, NOISE_KINDS
    from distnoisy.data.noise import NOISE
    from distnoisy.data.prepare import DATASET_LOADERS

    assert sorted(DATASETS) == DATASET_LOADERS.names()
    assert sorted(NOISE_KINDS) == sorted(["none", "file", "cifar_n", *NOISE.names()])
    from distnoisy.core.choices import CIFAR_N_SETS
    from distnoisy.data.cifar_n import LABEL_SETS

    assert list(CIFAR_N_SETS) == list(LABEL_SETS)


# -- the layers, by path ------------------------------------------------------------------------
#: At most this many modules directly in distnoisy/ (entry points and the config schema): every
#: other module lives in the package of its layer.
MAX_TOP_LEVEL_MODULES = 8


def _imported_names(tree: ast.AST) -> set[str]:
    """Every absolute module name a module imports, anywhere in its body."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _layer_violations(in_layer: str, forbidden: tuple[str, ...]) -> list[str]:
    """Modules under ``distnoisy/<in_layer>`` that import a name in (or under) ``forbidden``."""
    bad = []
    for name, (path, _, tree) in _parsed().items():
        if not (name == f"distnoisy.{in_layer}" or name.startswith(f"distnoisy.{in_layer}.")):
            continue
        for imported in sorted(_imported_names(tree)):
            if any(imported == f or imported.startswith(f + ".") for f in forbidden):
                bad.append(f"{_rel(path)} imports {imported}")
    return bad


def _importers_of(top: str) -> set[str]:
    """The distnoisy packages (first level below distnoisy) whose modules import ``top``."""
    out = set()
    for name, (_, _, tree) in _parsed().items():
        if any(n == top or n.startswith(top + ".") for n in _imported_names(tree)):
            out.add(name.split(".")[1] if "." in name else name)
    return out


def test_core_imports_no_torch_and_nothing_outside_core():
    others = tuple(
        f"distnoisy.{p.stem}"
        for p in PACKAGE.iterdir()
        if p.stem not in ("core", "__pycache__", "__init__") and (p.is_dir() or p.suffix == ".py")
    )
    assert not _layer_violations("core", ("torch", "torchvision", *others))


def test_engine_imports_neither_launch_nor_driver_nor_mlflow_nor_ray():
    forbidden = ("distnoisy.launch", "distnoisy.driver", "distnoisy.tracking", "mlflow", "ray")
    assert not _layer_violations("engine", forbidden)


def test_only_launch_and_tune_import_ray():
    assert _importers_of("ray") <= {"launch", "tune"}, _importers_of("ray")


def test_only_tracking_imports_mlflow():
    assert _importers_of("mlflow") <= {"tracking"}, _importers_of("mlflow")


def test_few_modules_at_the_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_layer_check_sees_a_violation():
    # The checks above must be able to fail: the import finder sees every kind of import.
    tree = ast.parse("import ray.train\nfrom mlflow import client\ndef f():\n    import torch\n")
    assert _imported_names(tree) == {"ray.train", "mlflow", "torch"}
