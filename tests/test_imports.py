"""The package has no import cycle among its modules' top-level imports (imports inside functions are the
deliberate way to reach a module lazily), and the core never imports a host or the host adapters."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("quant", "kernels", "models", "nodes", "ui", "bench")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["lowbit"] + parts)


def _files():
    yield ROOT / "__init__.py"
    for f in ("cli.py", "recipes.py", "_errors.py"):
        if (ROOT / f).exists():
            yield ROOT / f
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _top_level_imports(path: Path, modules: set):
    """Modules imported at module level (not inside a def/class body)."""
    me = _module_name(path)
    is_pkg = path.name == "__init__.py"
    base = me.split(".") if is_pkg else me.split(".")[:-1]
    tree = ast.parse(path.read_text())
    out = set()

    def visit(nodes):
        for n in nodes:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(n, ast.ImportFrom) and n.level:
                pkg = base[: len(base) - (n.level - 1)]
                target = ".".join(pkg + ([n.module] if n.module else []))
                cands = [f"{target}.{a.name}" for a in n.names] + [target]
                for c in cands:
                    if c in modules and c != me:
                        out.add(c)
                        break
            elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("lowbit"):
                if n.module in modules:
                    out.add(n.module)
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(n, field, None)
                if isinstance(sub, list):
                    visit(sub)

    visit(tree.body)
    return out


def _graph():
    files = list(_files())
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _top_level_imports(f, modules) for f in files}


def test_no_import_cycle_between_modules():
    g = _graph()
    # a package's __init__ re-exporting its submodules is not a cycle with them: drop edges into package inits
    inits = {m for m in g if (ROOT / Path(*m.split(".")[1:]) / "__init__.py").exists() or m == "lowbit"}
    g = {m: {d for d in deps if d not in inits} for m, deps in g.items()}
    state, stack, cycles = {}, [], []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_core_never_imports_a_host_or_an_adapter():
    bad = []
    for f in list((ROOT / "quant").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py")):
        for n in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                names = [("." * n.level) + (n.module or "")]
            for name in names:
                if name.split(".")[0] in ("comfy", "modules", "folder_paths", "gradio", "backend") or \
                        any(p in name for p in ("..nodes", "..ui", "..scripts")):
                    bad.append(f"{f.relative_to(ROOT)}: {name}")
    assert not bad, bad


def test_ui_never_imports_the_comfyui_nodes():
    for f in (ROOT / "ui").rglob("*.py"):
        src = f.read_text()
        assert "..nodes" not in src and "lowbit.nodes" not in src, f
