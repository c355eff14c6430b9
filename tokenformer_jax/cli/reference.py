"""Write docs/cli.md, the command-line reference, from the tools' own flag definitions.

  python -m tokenformer_jax.cli.reference            # rewrite docs/cli.md
  python -m tokenformer_jax.cli.reference --check    # exit 1 if docs/cli.md is not what it would write

Every main module of the repository (`tools.discover()`: tokenformer_jax/, launch/, experiments/) is run in a
forked child up to the point where it would parse its command line, and reports the flags it defines (absl) or
its parser's arguments (argparse). Each tool gets the first paragraph of its module docstring and a table of the
flags that module itself defines; flags defined once for several tools (tokenformer_jax/cli/common.py,
checkpoint_flags.py, launch.tpu's TPU flags) are listed once under "Shared flags" and named in each tool that
uses them. tests/test_docs.py runs `--check`: change a flag, then run the first command above.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from tokenformer_jax.cli import tools

OUTPUT = tools.REPO / "docs" / "cli.md"
COMMAND = "python -m tokenformer_jax.cli.reference"
ENV = {"JAX_PLATFORMS": "cpu"}
GROUPS = (("Training, growth and planning", ("tokenformer_jax.cli.train", "tokenformer_jax.cli.grow",
                                             "tokenformer_jax.cli.plan", "tokenformer_jax.cli.report")),
          ("Using a trained model", ("tokenformer_jax.cli.eval", "tokenformer_jax.cli.generate",
                                     "tokenformer_jax.cli.lm_eval")),
          ("The authors' checkpoints", ("tokenformer_jax.cli.import_neox", "tokenformer_jax.cli.export_neox")),
          ("Data", ("tokenformer_jax.data.prepare", "tokenformer_jax.data.tokenizer",
                    "tokenformer_jax.data.tfds_builder")),
          ("Launching", ("launch.ladder", "launch.tpu", "launch.local")),
          ("Developer tools", ("tokenformer_jax.cli.reference", "tokenformer_jax.cli.doccheck")))


def slug(heading: str) -> str:
  """GitHub's anchor for a heading (what docs link to): lower case, punctuation other than - and _ dropped."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def first_paragraph(docstring: str) -> str:
  return " ".join(docstring.strip().split("\n\n")[0].split())


def cell(text) -> str:
  return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def default_text(value) -> str:
  if value is None:
    return ""
  if isinstance(value, bool):
    return f"`{str(value).lower()}`"
  if isinstance(value, float):
    return f"`{value:g}`"
  if isinstance(value, list):
    return f"`{','.join(map(str, value))}`" if value else "(empty)"
  if value == "":
    return "`''`"
  return f"`{cell(value)}`"


TYPES = {"comma separated list of strings": "list (comma-separated)", "multi string": "string, repeatable",
         "int": "integer"}


def absl_type(flag: dict) -> str:
  if flag["enum"]:
    kind = "one of, repeatable:" if "multi" in flag["type"] else "one of"
    return f"{kind} " + ", ".join(f"`{v}`" for v in flag["enum"])
  return TYPES.get(flag["type"], flag["type"])


def sentence(text: str) -> str:
  text = text.strip()
  return text if not text or text[-1] in ".!?)" else text + "."


def absl_table(flags: list[dict]) -> list[str]:
  rows = ["| flag | type | default | meaning |", "|---|---|---|---|"]
  for f in sorted(flags, key=lambda f: f["name"]):
    name = f"`--{f['name']}`" + (f" (`-{f['short_name']}`)" if f["short_name"] else "")
    rows.append(f"| {name} | {cell(absl_type(f))} | {default_text(f['default'])} | {cell(sentence(f['help']))} |")
  return rows


def argparse_table(actions: list[dict]) -> list[str]:
  rows = ["| argument | default | meaning |", "|---|---|---|"]
  for a in actions:
    if not a["options"]:
      name = f"`{a['name']}`" + (" (" + ", ".join(f"`{c}`" for c in a["choices"]) + ")" if a["choices"] else "")
      rows.append(f"| {name} (positional) | | {cell(sentence(a['help']))} |")
      continue
    name = ", ".join(f"`{o}`" for o in a["options"])
    meaning = sentence(a["help"]) + (" One of: " + ", ".join(f"`{c}`" for c in a["choices"]) + "." if a["choices"] else "")
    default = "" if a.get("flag") else default_text(a["default"])
    rows.append(f"| {name} | {default} | {cell(meaning.strip())} |")
  return rows


def shared_heading(module: str) -> str:
  return f"Shared: `{module}`"


def is_shared_module(name: str) -> bool:
  return name != "__main__" and name.split(".")[0] in ("tokenformer_jax", "launch")


def collect() -> dict:
  """{module: (tool, data)} for every main, described in forked children of this process."""
  tools.preload()
  described = {}
  for tool in tools.discover():
    data = None
    if tool.kind != "other":
      outcome = tools.run_main(tool.module, [], mode="describe", env=ENV)
      if outcome.rc != 0 or outcome.data is None:
        raise RuntimeError(f"could not read the flags of {tool.module} (exit {outcome.rc}):\n{outcome.output[-3000:]}")
      data = outcome.data
    described[tool.module] = (tool, data)
  return described


def render(described: dict) -> str:
  """docs/cli.md from every tool's described flags. (Over 60 lines on purpose: the page's sections in the order
  they appear.)"""
  # Flags defined by repository modules other than the tool itself: the shared ones, by module.
  shared: dict[str, dict[str, dict]] = {}
  for _, data in described.values():
    if data and data["kind"] == "absl":
      for module, flags in data["modules"].items():
        if is_shared_module(module):
          shared.setdefault(module, {}).update({f["name"]: f for f in flags})
  users: dict[str, list[str]] = {m: [] for m in shared}
  sections, uses = {}, {}
  for module, (tool, data) in described.items():
    lines = [f"## `{module}`", "", first_paragraph(tool.docstring), ""]
    command = f"python -m {module}"
    if data is None:
      lines += [f"`{tool.path}` · `{command}`. Its arguments are not declared to a parser this reference can read; "
                "its docstring:", "", "```text", tool.docstring.strip(), "```", ""]
    elif data["kind"] == "argparse":
      lines += [f"`{tool.path}` · `{command}` (argparse: `{command} --help`)", "", *argparse_table(data["actions"]), ""]
    else:
      own = [f for f in data["modules"].get("__main__", []) if f["name"] not in shared.get(module, {})]
      used = set(data["used"]) | {f["name"] for f in data["modules"].get("__main__", [])}
      tool_uses = []
      for shared_module, flags in sorted(shared.items()):
        if shared_module in data["modules"] or shared_module == module:
          names = sorted(n for n in flags if n in used)
          if names:
            tool_uses.append((shared_module, names))
            users[shared_module].append(module)
      uses[module] = tool_uses
      note = "; ".join(", ".join(f"`--{n}`" for n in names) + f" ([{m}](#{slug(shared_heading(m))}))"
                       for m, names in tool_uses)
      lines += [f"`{tool.path}` · `{command} --help` lists these" + (f" · shared flags: {note}" if note else ""), ""]
      lines += (absl_table(own) if own else ["(no flags of its own)"]) + [""]
    sections[module] = lines

  grouped = [m for _, members in GROUPS for m in members if m in sections]
  rest = [m for m in sections if m not in grouped]
  groups = [(title, [m for m in members if m in sections]) for title, members in GROUPS]
  groups.append(("Experiments and other scripts", rest))

  out = ["# Command-line reference", "",
         f"Generated by `{COMMAND}` from the flags the tools define; do not edit it by hand. `tests/test_docs.py` "
         f"fails when it is stale: after changing a flag, run `{COMMAND}`.", "",
         "Each tool below lists the flags its own module defines, with their defaults; flags that several tools "
         "share are listed once, under [Shared flags](#shared-flags). Every absl tool also takes absl's own flags "
         "(`--help`, `--helpfull`, `--flagfile=FILE`, `--verbosity=N` or `-v N`; `--helpfull` also lists the "
         "flags of the libraries it imports). Config fields are set with `--set field.sub=value`, not with flags of "
         "their own: see [training.md](training.md).", ""]
  for title, members in groups:
    if members:
      out.append(f"- {title}: " + ", ".join(f"[`{m}`](#{slug('`' + m + '`')})" for m in members))
  out += ["- [Shared flags](#shared-flags)", ""]
  for title, members in groups:
    if not members:
      continue
    out += [f"# {title}", ""]
    for m in members:
      out += sections[m]
  out += ["# Shared flags", ""]
  for shared_module, flags in sorted(shared.items()):
    path = shared_module.replace(".", "/") + ".py"
    who = ", ".join(f"`{u}`" for u in sorted(set(users[shared_module])))
    out += [f"## {shared_heading(shared_module)}", "", f"Defined in `{path}`; used by {who}." if who else f"Defined in `{path}`.",
            "", *absl_table(list(flags.values())), ""]
  while out and out[-1] == "":
    out.pop()
  return "\n".join(out) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="compare docs/cli.md with what would be written; exit 1 "
                      "if it differs")
  parser.add_argument("--out", default=str(OUTPUT), help="where to write the reference")
  args = parser.parse_args(argv)
  os.environ.update(ENV)
  text = render(collect())
  if args.check:
    current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
    if current != text:
      print(f"docs/cli.md is stale (a flag, a default or a tool changed): regenerate it with `{COMMAND}`",
            file=sys.stderr)
      sys.exit(1)
    print("docs/cli.md is up to date")
    return
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
