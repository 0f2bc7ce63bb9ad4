"""The repository root, for the test tools that also run as scripts.

tests/emulated_cases.py, fuzz_emulated.py, kernel_coverage.py and mutants.py import
``tools`` and ``bench``, packages of the repository root. Under pytest the root is on
the path (``pythonpath`` in pyproject.toml) and scripts/run_tests_tool.sh puts it on
PYTHONPATH; a tool run as a script any other way (``python tests/fuzz_emulated.py``)
starts again at once with the root on PYTHONPATH (``rerun_with_root``). The Python
subprocesses the tests and tools start get it the same way (``env``).
"""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(*first: str, base=None) -> dict:
    """A copy of ``base`` (default: os.environ) with the folders `first`, then the
    repository root, at the front of PYTHONPATH."""
    out = dict(os.environ if base is None else base)
    rest = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    out["PYTHONPATH"] = os.pathsep.join(list(first) + [ROOT] + rest)
    return out


def _tools_importable() -> bool:
    """Whether ``import tools`` finds this checkout's tools/ package."""
    spec = importlib.util.find_spec("tools")
    here = os.path.realpath(os.path.join(ROOT, "tools"))
    return bool(spec and spec.submodule_search_locations) and any(
        os.path.realpath(p) == here for p in spec.submodule_search_locations)


def rerun_with_root(module_name: str) -> None:
    """Called at the top of a tool with its ``__name__``: a script run where this
    checkout's tools/ is not importable runs again, replacing this process, with the
    repository root on PYTHONPATH. Imported as a module, it does nothing."""
    if module_name != "__main__" or _tools_importable():
        return
    if ROOT in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        return  # the root is there already: the import that follows says what is wrong
    os.execve(sys.executable, [sys.executable] + sys.argv, env())
