"""The lock file: the exact versions of everything the trainer imports on a TPU worker.

`lock_text()` walks the dependency closure of this package's `install_requires` plus its `tpu` extra (read from
setup.py) through the distributions installed in the launching Python, and writes one `name==version` line for
each, with the Python version in a header. The ladder writes it to WORKDIR/requirements.lock when it first starts
and reuses that file ever after, so a stage resumed days later, on a recreated VM, runs the same jax, jaxlib,
libtpu, Orbax, ... as the first step did. Workers install it with `uv pip sync` (worker.py).
"""
from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SETUP = pathlib.Path(__file__).resolve().parent.parent / "setup.py"
PYTHON = re.compile(r"^# python (\d+\.\d+\.\d+)$", re.M)


def package_requirements(setup_py: pathlib.Path = SETUP, extras: tuple[str, ...] = ("tpu",)) -> list[str]:
  """install_requires + extras_require[e] for e in extras, read from setup.py's literals (no import, no build)."""
  tree = ast.parse(setup_py.read_text())
  call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
  keywords = {k.arg: k.value for k in call.keywords}
  requirements = list(ast.literal_eval(keywords["install_requires"]))
  extra = ast.literal_eval(keywords["extras_require"]) if "extras_require" in keywords else {}
  for name in extras:
    requirements += extra[name]
  return requirements


class Installed:
  """The launching Python's distributions: version and requirement strings by name (injectable for tests)."""

  def version(self, name: str) -> str:
    return importlib.metadata.version(name)

  def requires(self, name: str) -> list[str]:
    return importlib.metadata.requires(name) or []


# Markers are evaluated for the workers (Linux on x86_64), not for the launching machine (which may be a Mac).
WORKER_ENVIRONMENT = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux",
                      "platform_machine": "x86_64", "os_name": "posix"}


def closure(requirements: list[str], installed: Installed | None = None,
            environment: dict | None = None) -> dict[str, str]:
  """{canonical name: installed version} of `requirements` and everything they require, recursively, with extras
  and markers evaluated for `environment` (default: a TPU worker's). A missing distribution raises ValueError."""
  installed = installed or Installed()
  env = environment or WORKER_ENVIRONMENT
  found: dict[str, str] = {}
  seen: set[tuple[str, frozenset]] = set()
  todo = [(Requirement(r), "") for r in requirements]
  missing = []
  while todo:
    req, extra = todo.pop()
    if req.marker and not req.marker.evaluate({**env, "extra": extra}):
      continue
    name = canonicalize_name(req.name)
    if (name, frozenset(req.extras)) in seen:
      continue
    seen.add((name, frozenset(req.extras)))
    try:
      found[name] = installed.version(req.name)
    except importlib.metadata.PackageNotFoundError:
      missing.append(str(req))
      continue
    for sub in installed.requires(req.name):
      for wanted in ("", *sorted(req.extras)):
        todo.append((Requirement(sub), wanted))
  if missing:
    raise ValueError(f"the launching Python lacks {', '.join(sorted(set(missing)))}, which TPU workers need: run "
                     "`pip install -e '.[tpu]'` here first (the lock file records the versions installed here)")
  return found


def lock_text(requirements: list[str] | None = None, installed: Installed | None = None,
              python_version: str | None = None) -> str:
  versions = closure(requirements if requirements is not None else package_requirements(), installed)
  python_version = python_version or ".".join(map(str, sys.version_info[:3]))
  lines = [f"{name}=={version}" for name, version in sorted(versions.items())]
  return "\n".join([f"# python {python_version}", "# tokenformer_jax[tpu] dependencies, written by launch.lock",
                    *lines]) + "\n"


def python_of(text: str) -> str:
  match = PYTHON.search(text)
  if not match:
    raise ValueError("the lock file has no `# python X.Y.Z` header line")
  return match.group(1)


def pinned(text: str) -> dict[str, str]:
  """{name: version} of a lock file's lines."""
  return dict(line.split("==", 1) for line in text.splitlines() if line and not line.startswith("#"))


