"""The docs cannot rot: every command in README.md and docs/*.md passes the doc-check
(tokenformer_jax/cli/doccheck.py), a broken one is caught, links resolve, and docs/cli.md is what
`python -m tokenformer_jax.cli.reference` would write.

The doc-check itself runs in one subprocess (it forks a child per command from a process that imported JAX
once), shared by the tests that read its report; the rest is in-process and fast.
"""
import json
import pathlib
import re
import textwrap

import pytest

from helpers import run_cli
from tokenformer_jax.cli import doccheck

REPO = pathlib.Path(__file__).resolve().parent.parent

# A guide with one mistake per line (and one good command), as a guide that rotted would have them.
BROKEN_DOC = """\
# A rotten guide

```bash
python -m tokenformer_jax.cli.trian --config=experiments/demo.py:demo --workdir=runs/x
python -m tokenformer_jax.cli.train --config=experiments/demo.py:demo --workdir=runs/x --learning_rate=1e-3
python -m tokenformer_jax.cli.train --config=experiments/demo.py:dmeo --workdir=runs/x
python -m tokenformer_jax.cli.train --config=experiments/demo.py:demo --workdir=runs/x --set optim.lr=1e-3
python -m tokenformer_jax.cli.grow --checkpoint=runs/x --config=experiments/demo.py:demo --dst=y --init=zeros
python -m tokenformer_jax.cli.plan --ladder=huge
python -m launch.ladder --ladder=paper --backend=tpu --workdir=gs://b/ladder --project=p --zone=us-central2-b
pip install -e '.[gpu]'
python -m tokenformer_jax.data.prepare --train_files='corpus/*.jsonl.gz' --store=/data/s [--shard_mb=256]
python -m tokenformer_jax.cli.train --config=experiments/demo.py:demo --workdir=runs/fine
```

```python
from tokenformer_jax.inference import load_modle
```

A [link](nowhere.md) and one to a [heading](#no-such-heading).
"""

EXPECTED = {   # line of BROKEN_DOC → what the report must say
    4: "no module tokenformer_jax.cli.trian in this repository",
    5: "Unknown command line flag 'learning_rate'",
    6: "has no config named 'dmeo'",
    7: "no field 'lr'",
    8: "value should be one of <zero_keys|random>",
    9: "unknown ladder 'huge'",
    10: "add --set data.tokenizer=gs://",   # (its dry run stops there: the shipped tokenizer cannot go to a TPU)
    11: "setup.py has no extra gpu",
    12: "[optional] syntax is not a command",
    16: "cannot import name 'load_modle'",
}


# Fast: extraction, links, the README's own promises ----------------------------------------------------------
def test_commands_come_from_bash_blocks_inline_spans_and_python_blocks(tmp_path):
  doc = tmp_path / "guide.md"
  doc.write_text(textwrap.dedent("""\
      Run `python -m launch.ladder --help` or read `launch.ladder`.

      ```bash
      # a comment line
      python -m tokenformer_jax.cli.train --config=experiments/demo.py:demo \\
          --workdir=runs/a   # the main job
      python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'
      python -m tokenformer_jax.cli.generate --checkpoint=runs/a --stop=$'\\n\\n' --prompt="a # b"
      ```

      ```text
      python -m not.a.command --here
      ```

      ```python file=experiments/mine.py
      from tokenformer_jax.config import TrainConfig
      mine = 1
      ```
      """))
  commands = doccheck.extract(doc)
  assert [(c.line, c.where, c.argv) for c in commands if c.where != "python"] == [
      (1, "inline", ["python", "-m", "launch.ladder", "--help"]),
      (5, "bash", ["python", "-m", "tokenformer_jax.cli.train", "--config=experiments/demo.py:demo",
                   "--workdir=runs/a"]),
      (7, "bash", ["python3", "-m", "venv", ".venv"]),
      (7, "bash", [".venv/bin/pip", "install", "-q", "-e", ".[test]"]),
      (8, "bash", ["python", "-m", "tokenformer_jax.cli.generate", "--checkpoint=runs/a", "--stop=\n\n",
                   "--prompt=a # b"])]
  python = [c for c in commands if c.where == "python"]
  assert len(python) == 1 and "mine = 1" in python[0].text
  assert python[0].files == {"experiments/mine.py": python[0].text}
  assert doccheck.top_level_names(python[0].text) == {"mine"}


def test_a_misspelled_module_or_an_unknown_program_fails_without_running_anything():
  checker = doccheck.Checker()
  for argv, phrase in [(["python", "-m", "tokenformer_jax.cli.trian", "--workdir=x"], "no module tokenformer_jax"),
                       (["python", "benchmarks/bench_nothing.py"], "no script benchmarks/bench_nothing.py"),
                       (["tokenformer-train", "--workdir=x"], "unknown program"),
                       (["python", "-m", "pytest", "-q", "tests/test_nothing.py"], "no test path"),
                       (["python", "-m", "pytest", "-m", "not sloww", "tests"], "no test is marked 'sloww'")]:
    result = checker.check(doccheck.Command("guide.md", 1, " ".join(argv), argv))
    assert not result.ok and phrase in result.message, (argv, result)


def test_links_in_the_readme_and_the_guides_resolve():
  assert [problem for path in doccheck.doc_files() for problem in doccheck.check_links(path)] == []


def test_the_readme_stays_short_and_ci_runs_its_test_command():
  readme = (REPO / "README.md").read_text(encoding="utf-8")
  assert len(readme.splitlines()) <= 250, "README.md is over 250 lines: move the new section to a guide in docs/"
  block = readme.split("**Run the tests**", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
  assert block.endswith("python -m pytest -q -n 2 tests"), block
  assert block in (REPO / ".ci" / "run").read_text(encoding="utf-8"), ".ci/run must run the README's test command"
  assert re.search(r'python -m pytest -q -m "not slow" tests', readme), "the README names the fast inner loop"
  guides = set(re.findall(r"\]\(docs/(\w+)\.md", readme))
  assert {p.stem for p in (REPO / "docs").glob("*.md")} <= guides, "every guide is linked from the README"


# Slow: the doc-check over the README, every guide and the rotten guide, in one subprocess ----------------------
@pytest.fixture(scope="module")
def report(tmp_path_factory):
  directory = tmp_path_factory.mktemp("doccheck")
  broken, out = directory / "rotten.md", directory / "report.json"
  broken.write_text(BROKEN_DOC)
  files = [str(p) for p in doccheck.doc_files()] + [str(broken)]
  result = run_cli("tokenformer_jax.cli.doccheck", f"--json={out}", *files)
  assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
  return json.loads(out.read_text()), result, broken


@pytest.mark.slow
def test_every_command_in_the_readme_and_the_guides_passes_the_doc_check(report):
  data, result, broken = report
  ours = [r for r in data["results"] if not r["place"].startswith(str(broken))]
  failed = [f"{r['place']}: {' '.join(r['argv'])[:120]}\n    {r['how']}: {r['message']}" for r in ours if not r["ok"]]
  assert not failed, "commands in the docs that fail the doc-check " \
                     "(python -m tokenformer_jax.cli.doccheck shows them):\n" + "\n".join(failed)
  assert len(ours) >= 100 and {"README.md", "docs/ladder.md"} <= {r["place"].split(":")[0] for r in ours}
  hows = {r["how"] for r in ours}
  assert {"--help, run", "flags parsed, --dry_run", "flags parsed"} <= hows, hows   # each way of checking is used


@pytest.mark.slow
def test_a_deliberately_broken_guide_is_caught_line_by_line(report):
  data, result, broken = report
  results = {int(r["place"].rsplit(":", 1)[1]): r for r in data["results"] if r["place"].startswith(str(broken))}
  for line, phrase in EXPECTED.items():
    assert not results[line]["ok"] and phrase in results[line]["message"], (line, results[line])
  assert results[13]["ok"], results[13]   # the one good command among them
  assert sorted(p.split(": ", 1)[1] for p in data["links"]) == [
      "link to #no-such-heading: rotten.md has no heading #no-such-heading".replace("rotten.md", str(broken)),
      "link to nowhere.md: no file nowhere.md"]
  assert result.returncode == 1 and f"FAIL {broken}:4" in result.stdout


@pytest.mark.slow
def test_the_cli_reference_is_what_the_flags_say():
  result = run_cli("tokenformer_jax.cli.reference", "--check")
  assert result.returncode == 0, (result.stderr.strip() or result.stdout[-2000:]) + \
      "\n(regenerate it: python -m tokenformer_jax.cli.reference)"
