"""Loss against training compute: read runs (metrics.jsonl + config.json), draw them, tabulate them.

A run's x axes are cumulative: a grown run starts where its parent ended, in FLOPs and in tokens, so a
progressive ladder is charged for every stage it took to get there (paper §4.1: "our approach reports
cumulative training costs").

    FLOPs of one step = config.flops_per_token(model, seq_len) × global_batch × seq_len

A ladder directory (what `launch.ladder` writes) holds one run per stage, `<stage>/`, and the grown
checkpoint it started from, `<stage>_grown/`, whose provenance names the parent run. `load_ladder` orders
the stages parent-first and chains their offsets; `load_runs` takes any mix of runs and ladder directories.
"""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from etils import epath

from tokenformer_jax import fileio
from tokenformer_jax.config import TrainConfig, count_params, flops_per_token
from tokenformer_jax.run import RunDir, read_metrics  # noqa: F401  (read_metrics: this module's, before run.py)


@dataclasses.dataclass
class Curve:
  """One run's metrics with its cumulative FLOPs and tokens (x values already offset by its ancestors)."""
  name: str
  config: TrainConfig
  train_steps: np.ndarray            # logged steps with a train loss
  train_loss: np.ndarray
  eval_steps: np.ndarray             # steps with a validation loss
  eval_loss: np.ndarray
  start_flops: float = 0.0           # the parent's cumulative FLOPs when this run started (0: from scratch)
  start_tokens: float = 0.0
  parent: str | None = None
  path: str = ""                     # the run directory
  style: dict = dataclasses.field(default_factory=dict)   # matplotlib keywords for this run's lines
  # A mixture's per-source validation losses (eval/<source>/loss) and eval.tasks' results (task/<name>/<metric>),
  # each as (steps, values).
  series: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)

  @property
  def flops_per_step(self) -> float:
    seq_len = self.config.example_tokens   # data.seq_len; an image's patches (and class token)
    return float(flops_per_token(self.config.model, seq_len)) * self.config.global_batch * seq_len

  @property
  def tokens_per_step(self) -> int:
    return self.config.global_batch * self.config.example_tokens

  @property
  def last_step(self) -> int:
    steps = [s for s in (self.train_steps, self.eval_steps) if len(s)]
    return int(max(s.max() for s in steps)) if steps else 0

  def flops(self, steps) -> np.ndarray:
    return self.start_flops + np.asarray(steps, float) * self.flops_per_step

  def tokens(self, steps) -> np.ndarray:
    return self.start_tokens + np.asarray(steps, float) * self.tokens_per_step

  @property
  def end_flops(self) -> float:
    return float(self.flops(self.last_step))

  @property
  def end_tokens(self) -> float:
    return float(self.tokens(self.last_step))

  @property
  def final_eval_loss(self) -> float:
    return float(self.eval_loss[-1]) if len(self.eval_loss) else math.nan

  def final_train_loss(self, last: int = 5) -> float:
    """Mean of the last `last` logged train losses (one step's loss is noisy)."""
    return float(np.mean(self.train_loss[-last:])) if len(self.train_loss) else math.nan

  def after(self, parent: Curve) -> Curve:
    """This run, started from `parent`'s end (its grown checkpoint)."""
    return dataclasses.replace(self, start_flops=parent.end_flops, start_tokens=parent.end_tokens,
                               parent=parent.name)

  def flops_to_reach(self, loss: float) -> float | None:
    """Cumulative FLOPs at which the validation loss first reaches `loss` (linear between evaluations);
    None if it never does."""
    x, y = self.flops(self.eval_steps), self.eval_loss
    if self.parent is None and len(x):   # a scratch run starts at 0 FLOPs above any target
      x, y = np.concatenate([[self.start_flops], x]), np.concatenate([[np.inf], y])
    for i in range(len(y)):
      if y[i] <= loss:
        if i == 0 or not np.isfinite(y[i - 1]):
          return float(x[i])
        fraction = (y[i - 1] - loss) / (y[i - 1] - y[i])
        return float(x[i - 1] + fraction * (x[i] - x[i - 1]))
    return None


def is_run(path: str | epath.Path) -> bool:
  return RunDir(path).is_training_run()


def load_run(workdir: str | epath.Path, name: str | None = None) -> Curve:
  """One run directory (written by `train.loop.train`) → its curve, starting at 0."""
  workdir, run = epath.Path(workdir), RunDir(workdir)
  if not run.is_training_run():
    raise FileNotFoundError(f"{workdir} is not a training run: it needs metrics.jsonl and config.json "
                            "(a directory written by tokenformer_jax.cli.train)")
  config = run.written_config()
  metrics = run.metrics()

  def series(key):
    points = sorted(metrics.get(key, {}).items())
    return np.array([s for s, _ in points], int), np.array([v for _, v in points], float)

  train_steps, train_loss = series("train/loss")
  eval_steps, eval_loss = series("eval/loss")
  per_source = {key: series(key) for key in sorted(metrics) if key.count("/") == 2 and key != "task/seconds" and
                (key.startswith("task/") or (key.startswith("eval/") and key.endswith("/loss")))}
  return Curve(name or workdir.name, config, train_steps, train_loss, eval_steps, eval_loss, path=str(workdir),
               series=per_source)


def grown_source(grown: RunDir) -> str | None:
  """The run a `cli.grow` checkpoint was grown from (its provenance's source), else None."""
  try:
    with grown:
      record = grown.provenance()
  except (OSError, ValueError):
    return None
  return None if record is None else record.source


def load_ladder(directory: str | epath.Path) -> list[Curve]:
  """Every run in a ladder directory, parents first, each offset by its ancestors' cumulative cost."""
  directory = epath.Path(directory)
  runs = {p.name: p for p in sorted(directory.iterdir()) if p.is_dir() and is_run(p)}
  if not runs:
    raise FileNotFoundError(f"{directory} holds no training runs (subdirectories with metrics.jsonl and "
                            "config.json)")
  parents: dict[str, str | None] = {}
  for name in runs:
    grown = RunDir.grown(directory, name)
    source = grown_source(grown) if grown.path.exists() else None
    parent = epath.Path(source).name if source else None
    parents[name] = parent if parent in runs and parent != name else None
  curves: dict[str, Curve] = {}

  def resolve(name: str, seen: tuple = ()) -> Curve:
    if name not in curves:
      curve = load_run(runs[name])
      parent = parents[name]
      if parent is not None and parent not in seen:
        curve = curve.after(resolve(parent, seen + (name,)))
      curves[name] = curve
    return curves[name]

  for name in runs:
    resolve(name)
  depth = {}
  for name in runs:
    d, p = 0, parents[name]
    while p is not None and d < len(runs):
      d, p = d + 1, parents[p]
    depth[name] = d
  return [curves[name] for name in sorted(runs, key=lambda n: (depth[n], n))]


def load_runs(paths) -> list[Curve]:
  """Runs and ladder directories, in the order given."""
  curves, homes = [], []
  for path in paths:
    loaded = [load_run(path)] if is_run(path) else load_ladder(path)
    curves.extend(loaded)
    homes.extend([epath.Path(path).resolve().parent.name if is_run(path) else epath.Path(path).name] * len(loaded))
  names = [c.name for c in curves]
  for i, curve in enumerate(curves):   # runs of the same name from different places: say where each is from
    if names.count(curve.name) > 1:
      curves[i] = dataclasses.replace(curve, name=f"{homes[i]}/{curve.name}")
  return curves


# Output ------------------------------------------------------------------------------------------------
def human(value: float, unit: str = "") -> str:
  for suffix, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(value) >= size:
      return f"{value / size:.3g}{suffix}{unit}"
  return f"{value:.3g}{unit}"


def table(curves: list[Curve]) -> str:
  """The final numbers of every run as a markdown table."""
  lines = ["| run | model | non-embedding params | from | steps | tokens (cumulative) | training FLOPs "
           "(cumulative) | final train loss | final validation loss | validation perplexity |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for c in curves:
    m = c.config.model
    shape = (f"TokenFormer d={m.d_model} L={m.n_layers}, tokens {m.param_tokens.query}/{m.param_tokens.ffn}"
             if m.architecture == "tokenformer" else f"Transformer d={m.d_model} L={m.n_layers}")
    params = count_params(m, storage=False)["non_embedding"]
    ppl = math.exp(min(c.final_eval_loss, 50.0)) if math.isfinite(c.final_eval_loss) else math.nan
    lines.append(f"| {c.name} | {shape} | {human(params)} | {c.parent or 'scratch'} | {c.last_step} | "
                 f"{human(c.end_tokens)} | {human(c.end_flops)} | {c.final_train_loss():.3f} | "
                 f"{c.final_eval_loss:.3f} | {ppl:.1f} |")
  return "\n".join(lines) + "\n"


def _axes_limits(curves: list[Curve]) -> tuple[float, float] | None:
  """Every validation point, and the train losses past the first tenth of each run (the first steps of a
  scratch run sit near ln(vocab) and would squash everything else)."""
  evals = [v for c in curves for v in c.eval_loss]
  trains = [v for c in curves for v in c.train_loss[len(c.train_loss) // 10:]]
  if not evals and not trains:
    return None
  low = min(evals + trains)
  high = max(evals + ([float(np.percentile(trains, 95))] if trains else []))
  pad = 0.05 * max(high - low, 0.1)
  return low - pad, high + pad


def plot(curves: list[Curve], path: str | epath.Path, title: str = "", train_loss: bool = True) -> None:
  """Validation loss (markers; train loss as a thin line) against cumulative FLOPs and against tokens."""
  import matplotlib

  fig, axes = new_figure(2, figsize=(13, 5.2))
  cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, c in enumerate(curves):
    style = {"color": cycle[i % len(cycle)], **c.style}
    for ax, x_of in ((axes[0], c.flops), (axes[1], c.tokens)):
      if train_loss and len(c.train_steps):
        ax.plot(x_of(c.train_steps), c.train_loss, color=style["color"], alpha=0.25, linewidth=0.8,
                linestyle=style.get("linestyle", "-"))
      if len(c.eval_steps):
        ax.plot(x_of(c.eval_steps), c.eval_loss, marker=style.get("marker", "o"), markersize=3.5,
                label=c.name if ax is axes[0] else None,
                **{k: v for k, v in style.items() if k != "marker"})
  limits = _axes_limits(curves)
  for ax, label in ((axes[0], "cumulative training FLOPs"), (axes[1], "cumulative training tokens")):
    ax.set_xlabel(label)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if limits:
      ax.set_ylim(*limits)
  axes[0].legend(fontsize=7.5, loc="upper right")
  note = "markers: validation loss; faint lines: train loss" if train_loss else "validation loss"
  fig.suptitle(f"{title} ({note})" if title else note, fontsize=11)
  save_figure(fig, path)


def series_names(curves: list[Curve]) -> list[str]:
  """The per-source and task series any of the runs has, in a stable order (sources first)."""
  return sorted({k for c in curves for k in c.series}, key=lambda k: (not k.startswith("eval/"), k))


def plot_series(curves: list[Curve], path: str | epath.Path, title: str = "") -> None:
  """One panel per per-source validation loss and per eval.tasks metric, against cumulative tokens, a line per
  run (the runs' colours as in `plot`)."""
  import matplotlib
  from matplotlib.lines import Line2D

  names = series_names(curves)
  columns = min(len(names), 3)
  rows = -(-len(names) // columns)
  fig, axes = new_figure(columns, rows=rows, figsize=(4.6 * columns, 3.6 * rows))
  axes = np.atleast_1d(axes).ravel()
  cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, name in zip(axes, names):
    for i, c in enumerate(curves):
      if name in c.series:
        steps, values = c.series[name]
        style = {"color": cycle[i % len(cycle)], **c.style}
        ax.plot(c.tokens(steps), values, marker=style.get("marker", "o"), markersize=3, label=c.name,
                **{k: v for k, v in style.items() if k != "marker"})
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("cumulative training tokens", fontsize=8)
    ax.grid(alpha=0.3)
  for ax in axes[len(names):]:
    ax.set_visible(False)
  handles = [Line2D([], [], marker="o", markersize=3, label=c.name, **{"color": cycle[i % len(cycle)], **c.style})
             for i, c in enumerate(curves)]
  fig.legend(handles=handles, loc="outside lower center", ncols=min(len(curves), 6), fontsize=8)
  fig.suptitle(f"{title}: per source and evaluations during training" if title else
               "per source and evaluations during training", fontsize=11)
  save_figure(fig, path)


def series_table(curves: list[Curve]) -> str:
  """The last value of every per-source and task series of every run, as a markdown table."""
  names = series_names(curves)
  lines = ["| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for c in curves:
    cells = [f"{c.series[n][1][-1]:.4g}" if n in c.series and len(c.series[n][1]) else "" for n in names]
    lines.append(f"| {c.name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def new_figure(columns: int = 1, *, rows: int = 1, figsize: tuple[float, float]):
  """(figure, axes) of `rows` rows of `columns` plots, drawn off-screen (matplotlib's Agg backend);
  `save_figure` writes and closes it."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt.subplots(rows, columns, figsize=figsize, constrained_layout=True, squeeze=rows == 1)


write_text = fileio.write_text   # the experiments' results are written whole too


def save_figure(fig, path: str | epath.Path) -> None:
  """Write a PNG whole (fileio's atomic writer), then close the figure."""
  import matplotlib.pyplot as plt
  try:
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    fileio.write_bytes(path, png.getvalue())
  finally:
    plt.close(fig)


def write_report(paths, out: str | epath.Path, title: str = "") -> tuple[epath.Path, epath.Path]:
  """Read the runs and ladders in `paths`; write `out`/report.png and `out`/report.md (and, when a run has a
  mixture's per-source losses or eval.tasks' results, `out`/series.png with their table). Returns the first two."""
  curves = load_runs([str(p) for p in paths])
  title = title or ", ".join(epath.Path(p).name for p in paths)
  out = epath.Path(out)
  png, md = out / "report.png", out / "report.md"
  plot(curves, png, title)
  heading = f"# {title}\n\n" if title else ""
  text = f"{heading}![loss against FLOPs and tokens](report.png)\n\n{table(curves)}"
  if series_names(curves):
    plot_series(curves, out / "series.png", title)
    text += (f"\n## Per source and evaluations during training\n\n![per-source losses and tasks](series.png)\n\n"
             f"{series_table(curves)}")
  fileio.write_text(md, text)
  return png, md


def ladder_report(workdir: str, say=print) -> None:
  """What the ladder runner calls after each stage: WORKDIR/report/report.{png,md}. A report that cannot be
  drawn says why and lets the ladder go on."""
  try:
    png, _ = write_report([workdir], epath.Path(workdir) / "report", title=f"ladder {epath.Path(workdir).name}")
    say(f"# report: {png}")
  except Exception as error:  # noqa: BLE001  (the report is a side product: never stop a ladder for it)
    say(f"# report not written: {error}")
