"""The layers import one way: no cycle among the project's modules (every import, those inside functions too),
the runtime's core imports nothing above it, and export/ never imports engine.loading."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "cascade_kernels", "export")
CORE = ("engine.errors", "engine.options", "engine.schedules", "engine.samplers", "engine.stage",
        "engine.executor", "engine.pipeline", "engine.text", "engine.images", "engine.offload")
# The fast path's torch-specific parts, the torch backend's own: nothing in the core reaches them.
TORCH_FAST = ("engine.backends.fast_unet", "engine.backends.text_constants", "engine.backends.compiled")
ABOVE_CORE = ("engine.backends", "engine.serve", "engine.bench", "engine.demo", "engine.testing", "engine.loading",
              "engine.assemble", "engine.model_dir", "engine.exported", "export", "engine.cli", "engine.plan")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file: `from pkg import sub` counts the submodule,
    `from pkg import name` and `import pkg` count pkg itself (its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            if len(submodules) < len(node.names):  # names defined in `base` itself (its __init__ for a package)
                targets.add(base)
            targets |= submodules
    return {t for t in targets if t in known and t != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()))


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_core_imports_nothing_above_it():
    edges = graph()
    for module in CORE:
        above = sorted(t for t in edges[module] if t.startswith(ABOVE_CORE))
        assert not above, f"{module} imports {above}"


def test_the_executor_depends_on_the_samplers_only():
    """The step executor knows U-Nets by their protocol (asked with getattr), and of the project the samplers."""
    assert graph()["engine.executor"] <= {"engine.samplers"}


def test_the_fast_paths_torch_parts_live_under_the_torch_backend():
    edges = graph()
    assert all(m in edges for m in TORCH_FAST)
    for module, targets in edges.items():
        reached = targets & set(TORCH_FAST)
        if reached:
            assert module.startswith("engine.backends.") or module.startswith("engine.loading"), (module, reached)


def test_the_engine_never_imports_export():
    """export/ imports the engine; the engine reaches export/ by name only (the exported backends' prepare
    hooks, the CLI's export command), so the two packages have no cycle, at module level or in functions."""
    edges = graph()
    for module, targets in edges.items():
        if module.startswith("engine"):
            reached = sorted(t for t in targets if t == "export" or t.startswith("export."))
            assert not reached, f"{module} imports {reached}"


def test_export_never_imports_loading():
    edges = graph()
    for module, targets in edges.items():
        if module == "export" or module.startswith("export."):
            assert "engine.loading" not in targets and "engine" not in targets, f"{module} imports {targets}"


# Imports of the project's own modules inside functions, each for a stated reason (a comment at the import).
IN_FUNCTION_ALLOWED = {
    ("engine.backends.attention", "cascade_kernels"), ("engine.backends.attention", "cascade_kernels.attention"),  # Triton
    ("engine.cli", "engine.serve"),  # the HTTP app and Ray: the [serve] and [ray] extras, for `serve` only
}


def test_project_imports_sit_at_the_top_of_their_modules():
    found = set()
    for name, path in modules().items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                        found.add((name, node.module))
                    elif isinstance(node, ast.Import):
                        found |= {(name, a.name) for a in node.names if a.name.split(".")[0] in PACKAGES}
    assert found <= IN_FUNCTION_ALLOWED, sorted(found - IN_FUNCTION_ALLOWED)



def test_every_module_imports_first_in_a_fresh_process():
    """A package's __init__ runs before any of its submodules: a cycle through it (engine/__init__ ->
    engine.loading -> export -> engine.<module>) fails only when that module is imported first, which the
    graph above does not see. Each module is imported first here, the project's modules cleared between."""
    script = f"""
import importlib, sys
failed = []
for name in {sorted(m for m in modules() if not m.endswith("__main__"))!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] in {PACKAGES!r}]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if "triton" not in str(exc).lower():  # the optional kernels' own dependency
            failed.append(f"{{name}}: {{exc}}")
print("\\n".join(failed))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", done.stdout


def test_the_cli_and_the_core_import_without_the_web_stack():
    """pydantic, FastAPI, Starlette and uvicorn are the [serve] extra's: the CLI (its serve defaults included,
    engine/serve/defaults.py) and engine.batch import and build their parser with none of them."""
    script = """
import sys
for name in ("pydantic", "fastapi", "starlette", "uvicorn"):
    sys.modules[name] = None  # an import of it now fails, as if not installed
import engine.cli, engine.offline
engine.cli.build_parser().parse_args(["serve", "--max-batch", "4"])
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
