"""Check every command in README.md and docs/*.md, so that the guides cannot rot.

  python -m tokenformer_jax.cli.doccheck                  # README.md and docs/*.md
  python -m tokenformer_jax.cli.doccheck docs/growth.md   # one guide
  python -m tokenformer_jax.cli.doccheck --list           # only show what would be checked, and how

The commands are every line of a fenced ```bash block (with `\\` continuations joined, `#` comments dropped and
`&&`, `;`, `|` splitting one line into several commands) and every inline `code span` that starts like a
command a reader would copy (`python -m ...`, `python benchmarks/....py`, `JAX_PLATFORMS=cpu python ...`). Each
is checked as cheaply as it can be, never by running it for real when that takes more than a moment:

- `--help`: run for real (it must print a usage);
- `launch.ladder` and `launch.tpu`: run for real with `--dry_run` added (before any `--`), with a fake `gcloud`
  first on PATH (tests/fake_gcloud.py; a dry run must not call it), after their flags were parsed as written;
- every other tool of this repository: its main runs up to its command line's parse and no further; the flags
  must parse (absl or argparse: an unknown flag, a bad enum value or a malformed number fails), and the
  references that can be checked here are: `--config=FILE.py:NAME` loads, `--set field=value` applies to it,
  `--ladder` names a ladder and `--stages` its stages. What needs data, a TPU or hours (training the demo, the
  studies, planning on libtpu) is checked this way;
- `launch.local ... -- COMMAND` and `launch.tpu run ... -- COMMAND`: the inner command is checked too;
- `pip install -e '.[EXTRA]'`: the extras exist in setup.py; `pytest`: the paths exist, `-m` is a valid marker
  expression of markers the tests use, and its options are ones this project uses;
- an inline span that is only `python -m MODULE` (a tool named in prose): no dry run, only the parse;
- a script that parses its arguments by hand (neither absl nor argparse): it exists and every argument word
  appears in its source;
- a ```python block: it compiles and its import lines work (the rest needs a trained run); one opened as
  ```python file=PATH is a file the guide has the reader write, and a `--config=PATH:NAME` must be defined in it;
- `python3 -m venv`, `tensorboard`, `huggingface-cli`, `gcloud`, `tfds` (programs not of this repository): not run.

A module, script or program that does not exist fails, as does a flag its tool does not define. The mains run
in children forked from this process (`tools.run_main`), so the whole check takes seconds per guide, not a
process start per command. Relative links (`[text](file.md#anchor)`) must name an existing file and heading.

(Over 400 lines on purpose: one checker per kind of command the guides hold (help, parse, describe, scripts,
gcloud lines), each small, and the tables that say which kind a command is; they share one parser of commands.)
"""
from __future__ import annotations

import argparse
import ast
import codecs
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import sys
import tempfile
import time

from tokenformer_jax.cli import tools

REPO = tools.REPO
DEFAULT_FILES = ("README.md", "docs/*.md")
EXTERNAL = {"tensorboard": "TensorBoard's viewer", "huggingface-cli": "the Hugging Face hub's CLI",
            "gcloud": "the Google Cloud CLI", "tfds": "TensorFlow Datasets' CLI (it needs TensorFlow)"}
SETUP_MODULES = {"venv": "creates the virtual environment (.ci/run does it)"}
PYTEST_OPTIONS = {"-q", "-x", "-v", "-s", "-m", "-k", "--durations", "--co", "--collect-only", "-p", "-rs", "--lf",
                  "--ff", "-n"}
PYTEST_VALUED = {"-m", "-k", "--durations", "-p", "-n"}
DRY_RUN_TOOLS = ("launch.ladder", "launch.tpu")
HELP = {"--help", "-h", "--helpfull", "--helpshort"}
INLINE_START = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:/usr/bin/time\s+(?:-v\s+)?)?"
                          r"(?:python3?|\.venv/bin/python)\s+(?:-m\s+\w|\S+\.py\b)")
ENV = {"JAX_PLATFORMS": "cpu"}


@dataclasses.dataclass
class Command:
  file: str
  line: int
  text: str
  argv: list[str]
  where: str = "bash"     # "bash" (a fenced block) or "inline" (a code span)
  files: dict = dataclasses.field(default_factory=dict)   # files the same guide has the reader write

  @property
  def place(self) -> str:
    return f"{self.file}:{self.line}"


@dataclasses.dataclass
class Result:
  command: Command
  ok: bool
  how: str
  message: str = ""
  seconds: float = 0.0


# Extraction -------------------------------------------------------------------------------------------------------
def strip_comment(line: str) -> str:
  """Drop a shell comment: a # that starts a word, outside quotes."""
  quote, previous = None, " "
  for i, char in enumerate(line):
    if quote:
      if char == quote and (quote == "'" or previous != "\\"):
        quote = None
    elif char in "'\"":
      quote = char
    elif char == "#" and previous in " \t":
      return line[:i].rstrip()
    previous = char
  return line


def _ansi_c(match: re.Match) -> str:
  return shlex.quote(codecs.decode(match.group(1), "unicode_escape"))


def split_commands(text: str) -> list[list[str]]:
  """One shell line → its simple commands as argv lists (split on &&, ||, ;, |)."""
  text = re.sub(r"\$'((?:[^'\\]|\\.)*)'", _ansi_c, text)
  lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
  lexer.whitespace_split = True
  lexer.commenters = ""
  commands, current = [], []
  for token in lexer:
    if token and set(token) <= set(";&|"):
      if current:
        commands.append(current)
      current = []
    else:
      current.append(token)
  if current:
    commands.append(current)
  return commands


def extract(path: pathlib.Path, name: str | None = None) -> list[Command]:
  """Every command of a markdown file: lines of ```bash blocks, command-like inline code spans, and ```python
  blocks (their imports are checked). A block opened as ```python file=PATH is a file the guide has the reader
  write: the guide's commands may name configs in it."""
  name = name or str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
  lines = path.read_text(encoding="utf-8").splitlines()
  commands, declared, fence, pending, start, block = [], {}, None, "", 0, []
  for number, line in enumerate(lines, 1):
    stripped = line.strip()
    if fence is None:
      opened = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)(.*)$", stripped)
      if opened:
        fence, block, start = (opened.group(1), opened.group(2).lower(), opened.group(3)), [], number
        continue
      for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", line):
        span = span.strip()
        if INLINE_START.match(span):
          for argv in split_commands(span):
            commands.append(Command(name, number, span, argv, "inline"))
      continue
    if stripped.startswith(fence[0]) and stripped.strip("`~") == "":
      if fence[1] == "python":
        code = "\n".join(block) + "\n"
        written = re.search(r"\bfile=(\S+)", fence[2])
        if written:
          declared[written.group(1)] = code
        commands.append(Command(name, start, code, [], "python"))
      fence = None
      continue
    block.append(line)
    if fence[1] not in ("bash", "sh", "shell"):
      continue
    body = strip_comment(line).rstrip()
    if not pending:
      start = number
    if body.endswith("\\"):
      pending += body[:-1] + " "
      continue
    text = (pending + body).strip()
    pending = ""
    if text:
      for argv in split_commands(text):
        commands.append(Command(name, start, text, argv))
  for command in commands:
    command.files = declared
  return commands


def doc_files(patterns=DEFAULT_FILES) -> list[pathlib.Path]:
  files = []
  for pattern in patterns:
    matched = sorted(REPO.glob(pattern)) if any(c in pattern for c in "*?[") else [REPO / pattern]
    files += [p for p in matched if p.is_file() or not any(c in pattern for c in "*?[")]
  return files


# Links -------------------------------------------------------------------------------------------------------------
def slug(heading: str) -> str:
  """GitHub's anchor for a heading."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  found, counts, fence = set(), {}, False
  for line in path.read_text(encoding="utf-8").splitlines():
    if line.strip().startswith(("```", "~~~")):
      fence = not fence
      continue
    heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if heading and not fence:
      base = slug(heading.group(1))
      n = counts.get(base, 0)
      counts[base] = n + 1
      found.add(base if n == 0 else f"{base}-{n}")
  found |= set(re.findall(r'<a (?:id|name)="([^"]+)"', path.read_text(encoding="utf-8")))
  return found


def check_links(path: pathlib.Path) -> list[str]:
  """Relative links that name a missing file or heading, as 'file:line: problem'."""
  problems, fence = [], False
  name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if line.strip().startswith(("```", "~~~")):
      fence = not fence
      continue
    if fence:
      continue
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
      if re.match(r"^[a-z]+:", target):
        continue
      file_part, _, anchor = target.partition("#")
      linked = (path.parent / file_part).resolve() if file_part else path
      if not linked.exists():
        problems.append(f"{name}:{number}: link to {target}: no file {file_part}")
      elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
        problems.append(f"{name}:{number}: link to {target}: {file_part or name} has no heading #{anchor}")
  return problems


# Checks ------------------------------------------------------------------------------------------------------------
class Checker:
  def __init__(self, gcloud_dir: str | None = None):
    self.tmp = tempfile.mkdtemp(prefix="doccheck-")
    self.gcloud_state = os.path.join(self.tmp, "gcloud-state.json")
    self.gcloud_dir = gcloud_dir or self._fake_gcloud()
    self.env = {**ENV, "PATH": f"{self.gcloud_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "FAKE_GCLOUD_STATE": self.gcloud_state, "TMPDIR": self.tmp}

  def _fake_gcloud(self) -> str:
    """tests/fake_gcloud.py as `gcloud` (strict: it refuses flags gcloud does not have), else a stub that refuses
    every call: a dry run must reach neither the real gcloud nor a cloud."""
    directory = os.path.join(self.tmp, "bin")
    os.makedirs(directory)
    fake = REPO / "tests" / "fake_gcloud.py"
    script = os.path.join(directory, "gcloud")
    with open(script, "w", encoding="utf-8") as f:
      if fake.exists():
        f.write(f"#!{sys.executable}\n" + fake.read_text(encoding="utf-8"))
      else:
        f.write("#!/bin/sh\necho \"doccheck: gcloud called: $*\" >&2\nexit 2\n")
    os.chmod(script, 0o755)
    return directory

  def _reset_gcloud(self) -> None:
    fake = REPO / "tests" / "fake_gcloud.py"
    if fake.exists():
      spec = importlib.util.spec_from_file_location("_doccheck_fake_gcloud", fake)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      pathlib.Path(self.gcloud_state).write_text(json.dumps(module.FakeCloud({}).state))

  def _gcloud_calls(self) -> list:
    try:
      return json.loads(pathlib.Path(self.gcloud_state).read_text()).get("calls", [])
    except (OSError, ValueError):
      return []

  def check(self, command: Command) -> Result:
    start = time.monotonic()
    self.declared = command.files
    try:
      if command.where == "python":
        how, message = self._python_block(command.text)
      else:
        how, message = self._check(command.argv, name_only=command.where == "inline" and is_bare(command.argv))
      ok = True
    except CheckFailed as failure:
      how, message, ok = failure.how, failure.message, False
    except Exception as error:  # noqa: BLE001  (a bug here: report it on the command, check the others)
      how, message, ok = "doccheck", f"the check itself failed: {type(error).__name__}: {error}", False
    return Result(command, ok, how, message, time.monotonic() - start)

  def _check(self, argv: list[str], name_only: bool = False) -> tuple[str, str]:
    env, argv = {}, list(argv)
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
      key, _, value = argv.pop(0).partition("=")
      env[key] = value
    if argv and argv[0] in ("/usr/bin/time", "time"):
      argv.pop(0)
      while argv and argv[0].startswith("-"):
        argv.pop(0)
    if not argv:
      raise CheckFailed("parse", "an empty command")
    for token in argv:
      if token.startswith("[") and "--" in token or token.endswith("]") and token.startswith("--"):
        raise CheckFailed("parse", f"{token!r}: [optional] syntax is not a command; write the command out")
    program = os.path.basename(argv[0])
    if re.fullmatch(r"python(3(\.\d+)?)?", program):
      return self._python(argv[1:], env, name_only)
    if re.fullmatch(r"pip3?", program):
      return self._pip(argv[1:])
    if program in EXTERNAL:
      return "not run", f"{EXTERNAL[program]}, not part of this repository"
    raise CheckFailed("parse", f"unknown program {argv[0]!r} (not python, pip, or one of {', '.join(EXTERNAL)})")

  def _python(self, args: list[str], env: dict, name_only: bool = False) -> tuple[str, str]:
    while args and args[0] in ("-u", "-B", "-O", "-X"):
      args = args[2:] if args[0] == "-X" else args[1:]
    if not args:
      raise CheckFailed("parse", "python without a module or script")
    if args[0] == "-m":
      if len(args) < 2:
        raise CheckFailed("parse", "python -m without a module")
      target, rest = args[1], args[2:]
      if target in SETUP_MODULES:
        return "not run", SETUP_MODULES[target]
      if target == "pip":
        return self._pip(rest)
      if target == "pytest":
        return self._pytest(rest)
      if tools.target_source(target) is None:
        if target.split(".")[0] in tools.MAIN_DIRS + ("benchmarks", "tests"):
          raise CheckFailed("parse", f"no module {target} in this repository")
        if importlib.util.find_spec(target.split(".")[0]) is None:
          raise CheckFailed("parse", f"no module named {target}")
        return "not run", f"{target} is not part of this repository"
    elif args[0].startswith("-"):
      raise CheckFailed("parse", f"python {args[0]}: only -m MODULE or a script is checked")
    else:
      target, rest = args[0], args[1:]
      if tools.target_source(target) is None:
        raise CheckFailed("parse", f"no script {target} in this repository")
    return self._tool(target, rest, env, name_only)

  def _tool(self, target: str, args: list[str], env: dict, name_only: bool = False) -> tuple[str, str]:
    env = {**self.env, **env}
    if HELP & set(args):
      outcome = tools.run_main(target, args, mode="run", env=env, timeout=60)
      text = outcome.output.lower()
      if outcome.rc not in (0, 1) or "traceback" in text or ("usage" not in text and "flags:" not in text):
        raise CheckFailed("--help", f"exit {outcome.rc}: {outcome.last_line}")
      return "--help, run", ""
    source = tools.target_source(target).read_text(encoding="utf-8")
    if tools.kind_of(source) == "other" and target not in tools.PARSED_ELSEWHERE:
      return self._by_hand(target, args, source)
    outer, inner = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
    declared = self.declared
    parsed = tools.run_main(target, args, mode="parse", env=env, timeout=120,
                            on_parsed=lambda flags: check_references(flags, target, declared))
    if parsed.rc != 0:
      raise CheckFailed("flags parsed", f"exit {parsed.rc}: {parsed.last_line}")
    how, notes = ["flags parsed"], []
    if target in DRY_RUN_TOOLS and not name_only:
      dry = [a for a in outer if a != "--follow"] + ([] if "--dry_run" in outer else ["--dry_run"])
      if "--follow" in outer:
        notes.append("--follow dropped from the dry run (it would poll forever)")
      self._reset_gcloud()
      outcome = tools.run_main(target, dry + (["--", *inner] if "--" in args else []), mode="run", env=env,
                               timeout=120)
      if outcome.rc != 0:
        raise CheckFailed("--dry_run", f"exit {outcome.rc}: {outcome.last_line}")
      calls = self._gcloud_calls()
      if calls:
        raise CheckFailed("--dry_run", f"the dry run called gcloud: {calls[0]}")
      how.append("--dry_run")
    if inner and (target == "launch.local" or (target == "launch.tpu" and outer[:1] == ["run"])):
      inner_how, inner_notes = self._check(inner)
      how.append(f"inner command: {inner_how}")
      notes += [inner_notes] if inner_notes else []
    return ", ".join(how), "; ".join(notes)

  def _python_block(self, code: str) -> tuple[str, str]:
    """A ```python block: it compiles, and its imports (only those: the rest needs a run) work."""
    try:
      tree = ast.parse(code)
    except SyntaxError as error:
      raise CheckFailed("python", f"does not compile: {error}") from None
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    program = compile(ast.Module(body=imports, type_ignores=[]), "<block>", "exec")

    def run(_):
      os.environ.update(self.env)
      os.chdir(REPO)
      sys.path[0] = str(REPO)
      exec(program, {"__name__": "__doc_block__"})  # noqa: S102  (the guide's own import lines)
      return 0

    outcome = tools.in_child(run, timeout=120)
    if outcome.rc != 0:
      raise CheckFailed("python imports", outcome.last_line)
    return "python: compiles, imports work", ""

  def _by_hand(self, target: str, args: list[str], source: str) -> tuple[str, str]:
    """A script that reads sys.argv itself: it exists, and every argument word appears in it."""
    for arg in args:
      word = arg.lstrip("-").split("=", 1)[0]
      if re.fullmatch(r"[A-Za-z_][\w-]*", word) and f'"{word}"' not in source and f"'{word}'" not in source:
        raise CheckFailed("source", f"{target} never mentions {word!r}")
    return "source (it parses sys.argv by hand)", ""

  def _pip(self, args: list[str]) -> tuple[str, str]:
    if not args or args[0] != "install":
      return "not run", f"pip {' '.join(args[:1])}"
    specs = [a for a in args[1:] if not a.startswith("-")]
    for spec in specs:
      match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec)
      if not match:
        continue
      extras = set((match.group(1) or "").split(",")) - {""}
      unknown = extras - setup_extras()
      if unknown:
        raise CheckFailed("setup.py", f"setup.py has no extra {', '.join(sorted(unknown))} "
                          f"(it has {', '.join(sorted(setup_extras()))})")
    return "setup.py extras", "installs: not run (.ci/run does)"

  def _pytest(self, args: list[str]) -> tuple[str, str]:
    i = 0
    while i < len(args):
      arg = args[i]
      if arg.startswith("-"):
        option = arg.split("=", 1)[0]
        if option not in PYTEST_OPTIONS:
          raise CheckFailed("pytest", f"pytest option {option} is not one this project uses")
        if option in PYTEST_VALUED and "=" not in arg:
          i += 1
          value = args[i] if i < len(args) else ""
          if option == "-m":
            check_marker_expression(value)
      else:
        path = REPO / arg.split("::")[0]
        if not path.exists():
          raise CheckFailed("pytest", f"no test path {arg}")
      i += 1
    return "pytest arguments", "the suite itself: not run here"


def is_bare(argv: list[str]) -> bool:
  """`python -m MODULE` or `python SCRIPT.py` alone: in prose that names a tool rather than running it."""
  words = [a for a in argv if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", a)]
  return len(words) == 3 and words[1] == "-m" or len(words) == 2 and words[1].endswith(".py")


class CheckFailed(Exception):
  def __init__(self, how: str, message: str):
    super().__init__(message)
    self.how, self.message = how, message


def setup_extras() -> set[str]:
  tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "extras_require" and isinstance(node.value, ast.Dict):
      return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
  return set()


def check_marker_expression(expression: str) -> None:
  from _pytest.mark.expression import Expression
  try:
    Expression.compile(expression)
  except Exception as error:  # noqa: BLE001  (pytest's ParseError has moved between versions)
    raise CheckFailed("pytest", f"-m {expression!r}: {error}") from None
  used = set()
  for path in (REPO / "tests").rglob("*.py"):
    used |= set(re.findall(r"mark\.(\w+)", path.read_text(encoding="utf-8")))
  for name in set(re.findall(r"\b\w+\b", expression)) - {"and", "or", "not"}:
    if name not in used:
      raise CheckFailed("pytest", f"-m {expression!r}: no test is marked {name!r}")


# Tools that take a model config (ModelConfig) as well as a TrainConfig: cli.plan plans one with its default recipe.
MODEL_CONFIG_TOOLS = {"tokenformer_jax.cli.plan": "tokenformer_jax.plan:ladder_train_config"}


def check_references(parsed, target: str = "", declared: dict[str, str] | None = None) -> None:
  """In the child, after the flags parsed: what they name exists (configs, --set fields, ladders, stages).

  `declared`: files the guide has the reader write ({path: text}); a --config in one of them must be defined there
  (it is not run: such a file typically reads the reader's own run)."""
  from tokenformer_jax.config import ModelConfig, TrainConfig, apply_overrides, load_config

  def value(name):
    if isinstance(parsed, argparse.Namespace):
      return getattr(parsed, name, None)
    return parsed[name].value if name in parsed else None

  config, overrides, ladder = value("config"), value("set") or [], value("ladder")
  path, _, name = (config or "").partition(":")
  if ladder:
    from tokenformer_jax.ladder import load_ladder
    _, stages = load_ladder(ladder, overrides)
    unknown = set(value("stages") or []) - {s.name for s in stages}
    if unknown:
      raise ValueError(f"--stages: ladder {ladder} has no stage {', '.join(sorted(unknown))}")
  elif config and path in (declared or {}):
    if name not in top_level_names(declared[path]):
      raise ValueError(f"{path} (the file this guide has you write) defines no {name!r}")
  elif isinstance(parsed, argparse.Namespace):   # a script's own --config (e.g. a benchmark's model): it loads
    if isinstance(config, str) and re.fullmatch(r"\S+\.py:\w+", config):
      load_config(config)
  elif config or overrides:
    cfg = load_config(config or "experiments/demo.py:demo")   # --set alone (eval, generate): the fields of any config
    if isinstance(cfg, ModelConfig) and target in MODEL_CONFIG_TOOLS:
      module, _, function = MODEL_CONFIG_TOOLS[target].partition(":")
      cfg = getattr(__import__(module, fromlist=[function]), function)(cfg)
    cfg = apply_overrides(cfg, overrides)
    if config and not isinstance(cfg, TrainConfig):
      raise ValueError(f"{config} is a {type(cfg).__name__}; {target} needs a TrainConfig")
  model = value("model")
  if isinstance(parsed, argparse.Namespace) and isinstance(model, str) and "lm_eval" in sys.modules:
    from lm_eval.api import registry
    registry.get_model(model)


def top_level_names(source: str) -> set[str]:
  names = set()
  for node in ast.parse(source).body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
        names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
  return names


# The command line --------------------------------------------------------------------------------------------------
def run(files: list[pathlib.Path], *, listing: bool = False, say=print) -> tuple[list[Result], list[str]]:
  commands = [c for f in files for c in extract(f)]
  links = [p for f in files for p in check_links(f)]
  if listing:
    for c in commands:
      say(f"{c.place:24} {c.where:6} {shlex.join(c.argv) if c.argv else c.text.splitlines()[0] + ' ...'}")
    return [], links
  tools.preload()
  checker = Checker()
  results = []
  try:
    for command in commands:
      result = checker.check(command)
      results.append(result)
      shown = shlex.join(command.argv) if command.argv else command.text.strip().splitlines()[0] + " ..."
      say(f"{'ok  ' if result.ok else 'FAIL'} {command.place:22} [{result.how}] {shown.replace(chr(10), '|')[:150]}"
          + (f"\n       {result.message}" if result.message and not result.ok else ""), flush=True)
  finally:
    shutil.rmtree(checker.tmp, ignore_errors=True)
  return results, links


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("files", nargs="*", help="markdown files (default: README.md and docs/*.md)")
  parser.add_argument("--list", action="store_true", help="only list the commands and where they are")
  parser.add_argument("--json", default="", help="also write every result to this file as JSON")
  args = parser.parse_args(argv)
  files = [pathlib.Path(f).resolve() for f in args.files] or doc_files()
  missing = [str(f) for f in files if not f.is_file()]
  if missing:
    print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
    sys.exit(1)
  start = time.monotonic()
  results, links = run(files, listing=args.list)
  for problem in links:
    print(f"FAIL {problem}")
  failed = [r for r in results if not r.ok]
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"results": [{"place": r.command.place, "argv": r.command.argv, "where": r.command.where, "ok": r.ok,
                              "how": r.how, "message": r.message, "seconds": round(r.seconds, 3)} for r in results],
                 "links": links, "seconds": round(time.monotonic() - start, 1)}, f, indent=1)
  if not args.list:
    print(f"{len(results)} commands in {len(files)} files: {len(results) - len(failed)} ok, {len(failed)} failed; "
          f"{len(links)} broken links ({time.monotonic() - start:.1f} s)")
  if failed or links:
    sys.exit(1)


if __name__ == "__main__":
  main()
