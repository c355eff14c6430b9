"""The repository's command-line tools: find them, and run one's main in a forked child of this process.

`discover()` lists every main module (a file with `if __name__ == "__main__":`) under tokenformer_jax/, launch/
and experiments/. `run_main(target, args, mode=...)` runs one command line's main the way `python -m TARGET
ARGS` (or `python SCRIPT.py ARGS`) would, in a child forked from this process, so the heavy imports (jax, flax,
Orbax, grain) are paid once by the parent and each command costs a fraction of a second. Modes:

- "run": for real (what `--help` and `--dry_run` commands get);
- "parse": the tool's flags are parsed exactly as its main would parse them (absl's `FLAGS(argv)` where it calls
  `app.run`, argparse's `parse_args`), then `on_parsed` may check what they refer to, and the main is never called;
- "describe": nothing is parsed; the child reports the flags the tool defines (`docs/cli.md` is made from that).

`Forked(main, env)` starts `python -m MODULE ARGS` (or a script) for real in a forked child that runs beside its
parent, as subprocess.Popen would (launch.local's processes, the local ladder's stages), without the imports.

The parent of run_main must not have imported any module that defines absl flags (tokenformer_jax.cli.config_flags
and the mains): each child defines them afresh, as a real process would. `python -m tokenformer_jax.cli.doccheck`
and `python -m tokenformer_jax.cli.reference` are such parents.
"""
from __future__ import annotations

import argparse
import ast
import atexit
import dataclasses
import json
import os
import pathlib
import runpy
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

REPO = pathlib.Path(__file__).resolve().parents[2]
MAIN_DIRS = ("tokenformer_jax", "launch", "experiments")
# What every child needs anyway, imported once in the parent: the heavy libraries (none of them defines an absl
# flag of this repository's; `preload` checks that no repository flag came with them).
PRELOAD = ("numpy", "jax", "flax.linen", "optax", "orbax.checkpoint", "grain", "etils.epath", "sentencepiece",
           "tokenizers", "absl.app", "absl.flags", "absl.logging", "matplotlib.pyplot", "tokenformer_jax.config",
           "tokenformer_jax.train.loop", "tokenformer_jax.inference.evaluate", "tokenformer_jax.interop.neox",
           "tokenformer_jax.report", "tokenformer_jax.ladder", "tokenformer_jax.plan")
# Mains whose command line another library parses with argparse (lm_eval's own): they can be parsed, not described.
PARSED_ELSEWHERE = ("tokenformer_jax.cli.lm_eval",)


@dataclasses.dataclass(frozen=True)
class Tool:
  module: str         # tokenformer_jax.cli.train
  path: str           # tokenformer_jax/cli/train.py (relative to the repository)
  kind: str           # "absl", "argparse", or "other" (neither: it cannot be described or parsed without running)

  @property
  def docstring(self) -> str:
    return ast.get_docstring(ast.parse((REPO / self.path).read_text(encoding="utf-8"))) or ""


def kind_of(source: str) -> str:
  """How a main parses its command line: "absl" (it calls app.run), "argparse" (it imports argparse or calls a
  parse_args, e.g. experiments/_harness.py's), or "other" (neither: it cannot be described or parsed without
  running it)."""
  tree = ast.parse(source)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      func = node.func
      names.add(f"{func.value.id}.{func.attr}" if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                else getattr(func, "attr", getattr(func, "id", "")))
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names |= {f"import {a.name}" for a in node.names} | {f"import {getattr(node, 'module', '')}"}
  if "app.run" in names:
    return "absl"
  if "import argparse" in names or any(n == "parse_args" or n.endswith(".parse_args") for n in names):
    return "argparse"
  return "other"


def has_main(source: str) -> bool:
  """A top-level `if __name__ == "__main__":`."""
  for node in ast.parse(source).body:
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                     for c in node.test.comparators)):
      return True
  return False


def discover() -> list[Tool]:
  """Every main module of the repository, sorted by path."""
  tools = []
  for top in MAIN_DIRS:
    for path in sorted((REPO / top).rglob("*.py")):
      source = path.read_text(encoding="utf-8")
      if not has_main(source):
        continue
      relative = path.relative_to(REPO)
      tools.append(Tool(".".join(relative.with_suffix("").parts), str(relative), kind_of(source)))
  return sorted(tools, key=lambda t: t.path)


def preload() -> None:
  for name in PRELOAD:
    try:
      __import__(name)
    except ImportError:
      pass
  from absl import flags
  ours = sorted(m for m in flags.FLAGS.flags_by_module_dict() if m.split(".")[0] in MAIN_DIRS)
  if ours:
    raise RuntimeError(f"the parent process imported modules that define flags ({', '.join(ours)}): every child "
                       "would define them twice; import them only in the children")


@dataclasses.dataclass
class Outcome:
  rc: int
  output: str          # stdout and stderr together, or stdout alone with in_child(..., separate_stderr=True)
  data: Any = None
  seconds: float = 0.0
  stderr: str = ""
  timed_out: bool = False

  @property
  def last_line(self) -> str:
    lines = [line for line in self.output.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


class _Stop(BaseException):
  def __init__(self, code: int):
    super().__init__(code)
    self.code = code


def target_source(target: str) -> pathlib.Path | None:
  """The file behind `python -m TARGET` or `python TARGET` (a repository module or script), or None."""
  if target.endswith(".py"):
    path = REPO / target
  else:
    path = REPO / pathlib.Path(*target.split("."))
    path = path / "__main__.py" if path.is_dir() else path.with_suffix(".py")
  return path if path.is_file() else None


def run_main(target: str, args: list[str], *, mode: str, env: dict[str, str] | None = None,
             on_parsed: Callable[[Any], None] | None = None, timeout: float = 120.0,
             separate_stderr: bool = False) -> Outcome:
  """Run `python -m TARGET ARGS` (TARGET a module) or `python TARGET ARGS` (a .py path) in a forked child.

  `on_parsed(parsed)` (parse mode) gets absl's FLAGS or argparse's Namespace after a successful parse and may
  raise to fail the check (the error becomes the child's last output line, exit code 1)."""
  assert mode in ("run", "parse", "describe"), mode
  return in_child(lambda data_path: _child(target, args, mode, env or {}, on_parsed, data_path), timeout=timeout,
                  separate_stderr=separate_stderr)


def in_child(function: Callable[[str], int], *, timeout: float = 120.0, separate_stderr: bool = False) -> Outcome:
  """`function(data_path)` in a forked child with its stdout and stderr captured (into one text, or two); it
  returns an exit code and may write JSON to data_path (the Outcome's data). The child ends as an interpreter
  does: it waits for the threads it started that are not daemons, runs the exit handlers it registered (not the
  parent's), flushes."""
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="tools-") as tmp:
    out_path, err_path, data_path = (os.path.join(tmp, name) for name in ("out", "err", "data.json"))
    open(out_path, "w").close()
    open(err_path, "w").close()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:   # the child: never returns
      def setup():
        os.dup2(os.open(out_path, os.O_WRONLY), 1)
        os.dup2(os.open(err_path, os.O_WRONLY) if separate_stderr else 1, 2)
        os.setpgid(0, 0)   # its own process group: a timeout kills what it started too
      end_as_a_process(lambda: function(data_path), setup)
    rc = _wait(pid, timeout)
    output = pathlib.Path(out_path).read_text(encoding="utf-8", errors="replace")
    stderr = pathlib.Path(err_path).read_text(encoding="utf-8", errors="replace")
    timed_out = rc is None
    if timed_out:
      note = f"\n(timed out after {timeout:.0f} s)"
      output, stderr = (output, stderr + note) if separate_stderr else (output + note, stderr)
      rc = -9
    data = json.loads(pathlib.Path(data_path).read_text()) if os.path.exists(data_path) else None
    return Outcome(rc, output, data, time.monotonic() - start, stderr, timed_out)


def end_as_a_process(function: Callable[[], int], setup: Callable[[], None] = lambda: None, *,
                     parents_exit_handlers: bool = False) -> NoReturn:
  """In a child just forked: `setup()` (its output files), then `function()` as an interpreter runs a main (its
  exit code: what it returns, a SystemExit's, or 1 and the traceback for any other exception), then what the
  interpreter does at exit (wait for the threads it started that are not daemons, run the exit handlers it
  registered, and the parent's only if `parents_exit_handlers`; flush), and exit. (The parent's include those of
  the libraries it imported, such as jax's, which shuts jax.distributed down: a child that joins a job needs it.)"""
  code = 1
  try:
    setup()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    if not parents_exit_handlers:
      atexit._clear()  # pylint: disable=protected-access
    try:
      code = function()
    except SystemExit as error:
      code = _exit_code(error.code)
    except BaseException:  # noqa: BLE001  (anything: report it, as a process would)
      traceback.print_exc()
      code = 1
    threading._shutdown()  # pylint: disable=protected-access
    atexit._run_exitfuncs()  # pylint: disable=protected-access
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)


class Forked:
  """`python -m MODULE ARGS` / `python SCRIPT.py ARGS` (`main`: (MODULE or SCRIPT.py, ARGS)) with environment `env`,
  in a child forked from this process that imported the libraries (`preload`) and touched no device: what
  subprocess.Popen(..., start_new_session=True) runs, less 2-3 s of imports. Its stdout and stderr go to the file
  descriptor `output`, or to a pipe this process reads as `.stdout`; `new_session=False` keeps it in this
  process's group (a signal to the group reaches it). The child defines its flags as a fresh
  interpreter would: this process's main's own absl flags are removed there first and the rest unparsed. The
  exit handlers this process registered (its libraries': jax's shuts jax.distributed down, with a barrier that
  lets every process of a job finish) are the child's too; the caller registers none of its own."""

  def __init__(self, main: tuple[str, list[str]], env: dict[str, str], output: int | None = None,
               new_session: bool = True):
    read, write = os.pipe() if output is None else (None, output)
    sys.stdout.flush()
    sys.stderr.flush()
    self.pid, self.returncode = os.fork(), None
    if self.pid == 0:   # the child: never returns
      def setup():
        if new_session:
          os.setsid()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.stdout.reconfigure(line_buffering=True)   # as PYTHONUNBUFFERED does for a fresh interpreter
        _forget_main_flags()
      end_as_a_process(lambda: _run_python(*main), setup, parents_exit_handlers=True)
    if read is not None:
      os.close(write)
      self.stdout = os.fdopen(read, encoding="utf-8", errors="replace")

  def poll(self) -> int | None:
    if self.returncode is None:
      done, status = os.waitpid(self.pid, os.WNOHANG)
      if done:
        self.returncode = os.waitstatus_to_exitcode(status)
    return self.returncode

  def wait(self) -> int:
    while self.poll() is None:
      time.sleep(0.05)
    return self.returncode

  def send_signal(self, signum: int) -> None:
    if self.poll() is None:
      os.kill(self.pid, signum)

  def terminate(self) -> None:
    self.send_signal(signal.SIGTERM)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)


def forkable(command: list[str]) -> tuple[str, list[str]] | None:
  """(MODULE or SCRIPT.py, its arguments) of `python -m MODULE ARGS` or `python SCRIPT.py ARGS`, what Forked runs;
  None for any other command, or once this process has started a JAX backend (a child would inherit a runtime
  whose threads did not survive the fork)."""
  bridge = sys.modules.get("jax._src.xla_bridge")
  if bridge is not None and bridge.backends_are_initialized():
    return None
  if len(command) < 2 or command[0] not in ("python", "python3", sys.executable):
    return None
  if command[1] == "-m" and len(command) > 2:
    return command[2], command[3:]
  return (command[1], command[2:]) if command[1].endswith(".py") else None


def _forget_main_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  for flag in flags.FLAGS.get_flags_for_module(sys.argv[0]):   # absl files __main__'s flags under argv[0]
    delattr(flags.FLAGS, flag.name)
  flags.FLAGS.unparse_flags()


def _run_python(target: str, args: list[str]) -> int:
  """`python TARGET ARGS` (a script, relative to the working directory) or `python -m TARGET ARGS` in this process:
  sys.argv, sys.path[0] and the main module as the interpreter sets them."""
  sys.argv = [target, *args]
  if target.endswith(".py"):
    sys.path[0] = os.path.dirname(os.path.abspath(target))
    runpy.run_path(os.path.abspath(target), run_name="__main__")
  else:
    sys.path[0] = os.getcwd()
    runpy.run_module(target, run_name="__main__", alter_sys=True)
  return 0


def _wait(pid: int, timeout: float) -> int | None:
  deadline = time.monotonic() + timeout
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status)
    if time.monotonic() > deadline:
      for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
          kill()
        except OSError:
          pass
      os.waitpid(pid, 0)
      return None
    time.sleep(0.01)


def _exit_code(code) -> int:
  if code is None:
    return 0
  if isinstance(code, int):
    return code
  print(code, file=sys.stderr)
  return 1


def _child(target, args, mode, env, on_parsed, data_path) -> int:
  os.environ.update(env)
  os.chdir(REPO)
  source = target_source(target)
  parseable = target in PARSED_ELSEWHERE and mode == "parse"
  if mode != "run" and not parseable and (source is None or kind_of(source.read_text(encoding="utf-8")) == "other"):
    print(f"{target} has neither absl's app.run nor argparse: its arguments cannot be checked without running it")
    return 2
  _patch(mode, on_parsed, data_path)
  try:
    _run_python(target, args)   # from the repository root, where the target's path is relative to
  except _Stop as stop:
    return stop.code
  if mode != "run":
    print(f"{target} returned without parsing its arguments (neither app.run nor argparse was reached)")
    return 2
  return 0


# Patches of absl's app.run and argparse (parse and describe modes) ----------------------------------------------
def _patch(mode, on_parsed, data_path) -> None:
  if mode == "run":
    return
  from absl import app, flags

  def fake_run(main, argv=None, **_):
    del main
    if mode == "describe":
      _dump(data_path, {"kind": "absl", **_describe_absl(sys._getframe(1).f_globals)})
      raise _Stop(0)
    try:
      flags.FLAGS(sys.argv if argv is None else argv)
    except flags.Error as error:
      print(f"FATAL Flags parsing error: {error}", file=sys.stderr)
      raise _Stop(2) from None
    _checked(on_parsed, flags.FLAGS)

  app.run = fake_run
  depth = [0]
  parse_args, parse_known_args = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

  def outermost(original):
    def patched(self, *a, **kw):
      if mode == "describe" and depth[0] == 0:
        _dump(data_path, {"kind": "argparse", **_describe_argparse(self)})
        raise _Stop(0)
      depth[0] += 1
      try:
        result = original(self, *a, **kw)
      finally:
        depth[0] -= 1
      if depth[0] == 0:
        _checked(on_parsed, result[0] if isinstance(result, tuple) else result)
      return result
    return patched

  argparse.ArgumentParser.parse_args = outermost(parse_args)
  argparse.ArgumentParser.parse_known_args = outermost(parse_known_args)


def _checked(on_parsed, parsed) -> None:
  if on_parsed is not None:
    try:
      on_parsed(parsed)
    except Exception as error:  # noqa: BLE001
      print(f"error: {error}", file=sys.stderr)
      raise _Stop(1) from None
  raise _Stop(0)


def _dump(path, data) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)


def plain(value):
  """A default as JSON, with this checkout's absolute paths written relative to it (`tokenformer_jax/...`,
  `../shared/...`): the reference must not depend on where the repository is."""
  if value is None or isinstance(value, (bool, int, float)):
    return value
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  text = str(value)
  text = text.replace(str(REPO) + os.sep, "")
  return text.replace(str(REPO.parent) + os.sep, ".." + os.sep)


def _describe_absl(main_globals) -> dict:
  from absl import flags
  values = flags.FLAGS
  main_name = sys.argv[0]

  def describe(flag):
    parser = getattr(flag, "parser", None)
    enum = list(getattr(parser, "enum_values", None) or [])
    if not enum and hasattr(parser, "_parser"):   # multi_enum
      enum = list(getattr(parser._parser, "enum_values", None) or [])  # pylint: disable=protected-access
    text = " ".join((flag.help or "").split())
    if enum:   # absl writes the values in front of an enum's help
      text = text.removeprefix("<" + "|".join(enum) + ">: ")
    text = text.removesuffix("; repeat this option to specify a list of values")   # absl's, on multi flags
    return {"name": flag.name, "short_name": flag.short_name, "type": flag.flag_type(), "default": plain(flag.default),
            "help": text, "enum": enum, "boolean": bool(flag.boolean)}

  modules = {}
  for module, module_flags in values.flags_by_module_dict().items():
    name = "__main__" if module == main_name else module
    modules[name] = [describe(f) for f in module_flags]
  key = {f.name for f in values.key_flags_by_module_dict().get(main_name, [])}
  return {"modules": modules, "used": sorted(_referenced_flags(main_globals) | key)}


def _referenced_flags(namespace: dict) -> set[str]:
  """Flags the main module reaches: FlagHolders in its namespace, and those that functions it imported from
  flag-defining modules use (e.g. `load_experiment` → --config and --set)."""
  from absl import flags
  found, seen = set(), set()

  def visit_function(function):
    if id(function) in seen or not hasattr(function, "__code__"):
      return
    seen.add(id(function))
    codes = [function.__code__]
    while codes:
      code = codes.pop()
      codes += [c for c in code.co_consts if hasattr(c, "co_names")]
      for name in code.co_names:
        visit(function.__globals__.get(name))

  def visit(value):
    if isinstance(value, flags.FlagHolder):
      found.add(value.name)
    elif callable(value) and getattr(value, "__module__", "") in flag_modules:
      visit_function(value)

  flag_modules = {m for m in flags.FLAGS.flags_by_module_dict() if not m.startswith("absl")}
  for value in list(namespace.values()):
    visit(value)
  return found


def _describe_argparse(parser: argparse.ArgumentParser) -> dict:
  actions = []
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
      continue
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      actions.append({"name": action.dest, "options": [], "choices": sorted(action.choices), "help": action.help or "",
                      "default": None, "nargs": None})
      continue
    default = action.default if action.default is not argparse.SUPPRESS else None
    actions.append({"name": action.dest, "options": list(action.option_strings), "default": plain(default),
                    "help": " ".join((action.help or "").split()),
                    "choices": [plain(c) for c in action.choices] if action.choices else [],
                    "nargs": action.nargs if isinstance(action.nargs, (int, str, type(None))) else None,
                    "flag": action.nargs == 0})
  return {"actions": actions}
