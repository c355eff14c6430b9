"""Draw runs and ladders: validation (and train) loss against cumulative training FLOPs and tokens.

  python -m tokenformer_jax.cli.report runs/demo                          # one run → runs/demo/report/
  python -m tokenformer_jax.cli.report runs/tiny_ladder                   # a ladder: stages chained
  python -m tokenformer_jax.cli.report runs/a runs/b runs/ladder --out=runs/compare --title="a vs b"
  python -m tokenformer_jax.cli.report --goodput runs/demo                # where the time went → goodput.{png,md}

Writes OUT/report.png and OUT/report.md (a markdown table of the final numbers), and OUT/series.png when a run
has a mixture's per-source losses or eval.tasks' results (a panel each, their last values tabulated in report.md).
Reads only metrics.jsonl,
config.json and, in a ladder directory, the grown checkpoints' provenance (which stage grew from which).
With --goodput: OUT/goodput.png (a timeline) and OUT/goodput.md (goodput, the badput buckets in hours, lost
work), from each run's events.jsonl (a ladder: every stage, and their total); the table is printed too.
"""
from __future__ import annotations

from absl import app, flags
from etils import epath

from tokenformer_jax import goodput
from tokenformer_jax.cli.common import command
from tokenformer_jax.report import write_report

OUT = flags.DEFINE_string("out", None, "Where report.png and report.md go (default: WORKDIR/report for one "
                          "WORKDIR; required for several).")
TITLE = flags.DEFINE_string("title", "", "A title for the figure and the table.")
GOODPUT = flags.DEFINE_bool("goodput", False, "Where the time went instead: goodput (productive step time / wall "
                            "time), the badput buckets in hours and the steps lost to restarts, from each run's "
                            "events.jsonl, into OUT/goodput.{png,md}.")


@command(log="report", arguments=True)
def main(argv):
  paths = argv[1:]
  if not paths:
    raise ValueError("name at least one run or ladder directory: python -m tokenformer_jax.cli.report WORKDIR... "
                     "[--out=DIR]")
  for path in paths:
    if not epath.Path(path).is_dir():
      raise FileNotFoundError(f"{path} is not a directory; give run directories (with metrics.jsonl) or ladder "
                              "directories")
  if OUT.value is None and len(paths) > 1:
    raise ValueError("several directories need --out=DIR for the combined report")
  out = OUT.value or str(epath.Path(paths[0]) / "report")
  if GOODPUT.value:
    png, md, runs = goodput.write_goodput(paths, out, TITLE.value)
    print(goodput.table(runs), end="")
  else:
    png, md = write_report(paths, out, TITLE.value)
  print(f"wrote {png}\nwrote {md}")


if __name__ == "__main__":
  app.run(main)
