"""The package's layout: its imports point one way (no two files import each other, lazy imports included), the model
imports only torch, and `import lmforge` pulls in none of the optional features' libraries."""

import ast
import subprocess
import sys
from pathlib import Path

import lmforge

PACKAGE = Path(lmforge.__file__).parent
# GPT.from_pretrained, the documented API, hands over to the interop module that holds the conversion
EXCEPTIONS = {("lmforge.model", "lmforge.hf")}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str], top_level_only: bool = False) -> set[str]:
    """The package's modules this file imports anywhere in it (inside functions too), by their dotted names; with
    top_level_only, those its module body imports when it is imported."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= {t for t in [target] + [f"{target}.{a.name}" for a in node.names] if t in known}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
    return found - {name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) - {d for a, d in EXCEPTIONS if a == name}
            for name, path in mods.items()}


def import_time_graph() -> dict[str, set[str]]:
    """What importing each module runs: its module-level imports, and the __init__ of every subpackage it lies in
    (lmforge's own __init__, the public API, is left out: every module lies in it). A submodule that its package's
    __init__ imports itself runs inside that __init__, which is then already under way: no edge back."""
    mods = modules()
    g = {name: imports(name, path, set(mods), top_level_only=True) for name, path in mods.items()}
    for name in g:
        parent = name.rpartition(".")[0]
        if parent in mods and parent != "lmforge" and name not in g[parent]:
            g[name].add(parent)
    return g


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle of g as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(g):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_has_no_cycles():
    g = graph()
    assert len(g) > 25 and "lmforge.runs" in g and "lmforge.cpu.modules" in g  # (the parse sees the package)
    assert "lmforge.cpu.kernels" in g["lmforge.quantize"] and "lmforge.runs" in g["lmforge.quantize_run"]
    assert cycle(g) is None, " -> ".join(cycle(g))


def test_importing_any_module_runs_no_cycle():
    """Importing a submodule runs its package's __init__ first (lmforge.cpu's for lmforge.cpu.kernels): that order,
    with the imports each module body makes, has no cycle either."""
    g = import_time_graph()
    assert "lmforge.cpu" in g["lmforge.cpu.modules"] and "lmforge.serve" in g["lmforge.serve.app"]
    assert cycle({**g, "lmforge.cpu": g["lmforge.cpu"] | {"lmforge.cpu.modules"}}) is not None  # (what it guards)
    assert cycle(g) is None, " -> ".join(cycle(g))


def test_low_modules_import_nothing_above_them():
    g = graph()
    assert g["lmforge.checkpoint"] <= {"lmforge.errors", "lmforge.version"}  # it knows no run kinds
    assert g["lmforge.lora"] <= {"lmforge.errors"}
    assert not g["lmforge.model"]  # the model imports only torch (and, for from_pretrained, hf.py)
    assert not g["lmforge.request"] and not g["lmforge.cpu.kernels"] and not g["lmforge.cpu.pages"]
    top = {"lmforge.cli", "lmforge.serve", "lmforge.serve.app", "lmforge.export", "lmforge.finetune"}
    below = {name: top & deps for name, deps in g.items() if name not in top | {"lmforge.__main__"} and top & deps}
    assert not below, below


def test_the_model_file_imports_only_torch_and_the_standard_library():
    tree = ast.parse((PACKAGE / "model.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert roots <= {"__future__", "math", "torch"}, roots


def test_importing_lmforge_loads_no_optional_library():
    optional = ["transformers", "fastapi", "uvicorn", "onnx", "onnxruntime", "gguf", "datasets", "pyarrow",
                "matplotlib", "peft", "huggingface_hub", "prometheus_client", "zstandard", "llguidance"]
    code = f"import sys, lmforge; print([m for m in {optional!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
