"""The package's import graph: every module imports alone in a fresh interpreter, the module-level imports form no
cycle, and no function imports a package module to dodge one."""

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "diffdistill"


def _modules() -> dict:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _target(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    if not mod.startswith("diffdistill"):
        return []
    names = [mod] + [f"{mod}.{a.name}" for a in node.names]
    return [n for n in names if n in MODULES]


def _graph():
    edges, local = {m: set() for m in MODULES}, []
    for m, p in MODULES.items():
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _target(m, p, node)
                if id(node) in top:
                    edges[m].update(t for t in targets if t != m)
                elif targets:
                    local.append(f"{m}:{node.lineno} imports {targets[0]}")
            elif isinstance(node, ast.Import) and id(node) not in top:
                local += [f"{m}:{node.lineno} imports {a.name}" for a in node.names if a.name.startswith("diffdistill")]
    return edges, local


def test_no_function_level_imports_of_package_modules():
    _, local = _graph()
    assert not local, "\n".join(local)


def test_module_level_imports_form_no_cycle():
    edges, _ = _graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_every_module_imports_alone_in_a_fresh_interpreter(tmp_path):
    """One interpreter per module (forked from a parent that has imported only third-party libraries, so each
    child starts with no diffdistill module loaded: import order cannot hide a cycle). Two things keep the ~80
    children cheap: the parent also imports matplotlib (≈ 0.5 s per child through diffdistill.eval.plots
    otherwise), and the package's bytecode goes to a temporary folder, so only the first child compiles the
    sources even where the environment forbids .pyc files (PYTHONDONTWRITEBYTECODE: ≈ 0.6 s per child)."""
    code = (
        "import os, sys, importlib, traceback\n"
        "import torch, numpy, scipy, yaml, safetensors, PIL.Image  # third-party only\n"
        "import matplotlib.pyplot, matplotlib.backends.backend_agg\n"
        "assert not any(k.startswith('diffdistill') for k in sys.modules)\n"
        "sys.dont_write_bytecode, sys.pycache_prefix = False, sys.argv[1]\n"
        "bad = []\n"
        "for name in sys.argv[2:]:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "        except BaseException:\n"
        "            traceback.print_exc()\n"
        "            os._exit(1)\n"
        "        os._exit(0)\n"
        "    _, status = os.waitpid(pid, 0)\n"
        "    if status:\n"
        "        bad.append(name)\n"
        "print('FAILED:', bad) if bad else print('ok')\n"
        "sys.exit(1 if bad else 0)\n")
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pycache"), *MODULES], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
