"""Goodput and badput of a run or a ladder, from the event logs the trainer writes (train/events.py).

Every second of a run's wall time (the first attempt's process start to the last event) goes to exactly one
bucket; where events overlap (a compile inside the first step, a hang in a step) the one earlier in BUCKETS
wins:

  productive          steps whose result the run kept (the last computation of each step number)
  lost                steps computed again later (after a restore: a restart or a spike-guard rollback)
  data_wait           the part of a step spent waiting for its batch
  compile, profile, checkpoint_restore, checkpoint_save, eval, preemption, hang: as the events say
  startup             process start to the training loop (imports, joining the job, data set-up), less the above
  down                between attempts: from an attempt's last event to the next one's process start
  unaccounted         time inside an attempt that no event covers (the loop's bookkeeping, exiting)

goodput = productive / wall time. Lost work counts the steps computed more than once, across every restart.
"""
from __future__ import annotations

import dataclasses
import statistics

from etils import epath

from tokenformer_jax import fileio
from tokenformer_jax.train.events import FILE, read_events

BUCKETS = ("hang", "compile", "profile", "checkpoint_restore", "checkpoint_save", "preemption", "eval",
           "data_wait", "lost", "productive", "startup", "down")
RANK = {bucket: i for i, bucket in enumerate(BUCKETS)}
ALL_BUCKETS = ("productive", "lost", "data_wait", "compile", "profile", "checkpoint_restore", "checkpoint_save",
               "eval", "preemption", "hang", "startup", "down", "unaccounted")
SPANS = {"hang", "compile", "profile", "checkpoint_restore", "checkpoint_save", "preemption", "eval", "startup"}
SLOW_FACTOR = 3.0   # a step over this × the median step is listed as slow
COLORS = {"productive": "#2ca02c", "lost": "#d62728", "data_wait": "#bcbd22", "compile": "#9467bd",
          "profile": "#e377c2", "checkpoint_restore": "#8c564b", "checkpoint_save": "#1f77b4", "eval": "#17becf",
          "preemption": "#ff7f0e", "hang": "#000000", "startup": "#aec7e8", "down": "#c7c7c7",
          "unaccounted": "#ffffff"}


@dataclasses.dataclass
class Goodput:
  name: str
  wall_s: float
  seconds: dict[str, float]           # bucket → seconds (ALL_BUCKETS; they add up to wall_s)
  steps: int                          # distinct steps computed
  lost_steps: int                     # computations of a step that a later one replaced
  attempts: int
  restarts: int
  hangs: int
  preemptions: int
  median_step_s: float                # of the kept steps, each attempt's first step left out
  slow_steps: list[tuple[int, float, float]]   # (step, its time, its time over the median), over SLOW_FACTOR ×
                                               # the median (each attempt's first step left out here too)
  step_s: dict[int, float] = dataclasses.field(repr=False, default_factory=dict)   # kept step → its productive s
  segments: list[tuple[float, float, str]] = dataclasses.field(repr=False, default_factory=list)
  origin: float = 0.0

  @property
  def goodput(self) -> float:
    return self.seconds["productive"] / self.wall_s if self.wall_s > 0 else 0.0


def intervals(events: list[dict]) -> tuple[list[tuple[float, float, str, int | None]], int]:
  """(start, end, bucket, step event index) for every event, and the number of lost step computations."""
  steps = [(i, e) for i, e in enumerate(events) if e["kind"] == "step"]
  last = {e["step"]: i for i, e in steps}
  out, attempt_end = [], None
  for i, e in enumerate(events):
    start, end = float(e["start"]), float(e["end"])
    if e["kind"] == "startup":
      if attempt_end is not None and start > attempt_end:
        out.append((attempt_end, start, "down", None))
    elif e["kind"] == "step":
      waited = min(start + float(e.get("data", 0.0)), end)
      out.append((start, waited, "data_wait", None))
      out.append((waited, end, "productive" if last[e["step"]] == i else "lost", i))
    if e["kind"] in SPANS:
      out.append((start, end, e["kind"], None))
    attempt_end = end if attempt_end is None or e["kind"] == "startup" else max(attempt_end, end)
  return out, len(steps) - len(last)


def paint(spans: list[tuple[float, float, str, int | None]]) -> tuple[dict, dict, list]:
  """Give every instant to the highest-ranked span covering it: (bucket → seconds, a kept step's event index →
  its productive seconds, merged (start, end, bucket) segments). Time no span covers is "unaccounted"."""
  points = []
  for start, end, bucket, key in spans:
    if end > start:
      points += [(start, 1, RANK[bucket], key), (end, -1, RANK[bucket], key)]
  points.sort(key=lambda p: (p[0], p[1]))
  active, kept = [0] * len(BUCKETS), []   # kept: the productive steps' events now open (one at a time)
  totals, per_step, segments = dict.fromkeys(ALL_BUCKETS, 0.0), {}, []
  previous = None
  for time_, delta, rank, key in points:
    if previous is not None and time_ > previous:
      top = next((r for r, n in enumerate(active) if n), None)
      bucket = "unaccounted" if top is None else BUCKETS[top]
      totals[bucket] += time_ - previous
      if top == RANK["productive"] and kept:
        per_step[kept[-1]] = per_step.get(kept[-1], 0.0) + time_ - previous
      if segments and segments[-1][2] == bucket and segments[-1][1] == previous:
        segments[-1] = (segments[-1][0], time_, bucket)
      else:
        segments.append((previous, time_, bucket))
    active[rank] += delta
    if rank == RANK["productive"] and delta > 0:
      kept.append(key)
    elif rank == RANK["productive"]:
      kept.remove(key)
    previous = time_
  return totals, per_step, segments


def of_events(events: list[dict], name: str = "run") -> Goodput:
  """The goodput of one run's events."""
  if not any(e["kind"] == "startup" for e in events):
    raise ValueError(f"{name}: its event log has no attempt in it (no startup event)")
  spans, lost = intervals(events)
  totals, per_step, segments = paint(spans)
  origin = min(float(e["start"]) for e in events)
  wall = max(float(e["end"]) for e in events) - origin
  totals["unaccounted"] += max(wall - sum(totals.values()), 0.0)   # before the first span, after the last one
  step_s = {events[i]["step"]: s for i, s in per_step.items()}   # the kept computation's time
  firsts, after_startup = set(), False   # each attempt's first step: one-time work not painted as compile
  for e in events:
    if after_startup and e["kind"] == "step":
      firsts.add(e["step"])
    after_startup = e["kind"] == "startup" or (after_startup and e["kind"] != "step")
  usual = [t for s, t in step_s.items() if s not in firsts] or list(step_s.values())
  median = statistics.median(usual) if usual else 0.0
  slow = sorted((s, t, t - median) for s, t in step_s.items()
                if median and t > SLOW_FACTOR * median and s not in firsts)
  count = lambda kind, **match: sum(e["kind"] == kind and all(e.get(k) == v for k, v in match.items())  # noqa: E731
                                    for e in events)
  return Goodput(name=name, wall_s=wall, seconds=totals, steps=len({e["step"] for e in events if e["kind"] == "step"}),
                 lost_steps=lost, attempts=count("startup"), restarts=count("restart"),
                 hangs=sum(e["kind"] == "hang" and "exit" not in e for e in events),
                 preemptions=count("preemption"), median_step_s=median, slow_steps=slow, step_s=step_s,
                 segments=segments, origin=origin)


def load(path: str | epath.Path) -> list[Goodput]:
  """A run directory (with events.jsonl) → [its goodput]; a ladder directory → one per stage run, by start."""
  path = epath.Path(path)
  if (path / FILE).exists():
    return [of_events(read_events(path / FILE), path.name)]
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a directory; give a run directory (with {FILE}) or a ladder directory")
  runs = [of_events(read_events(p / FILE), p.name) for p in sorted(path.iterdir()) if (p / FILE).exists()]
  if not runs:
    raise FileNotFoundError(f"{path} has no {FILE}, nor any run directory with one (runs trained before the event "
                            "log have none)")
  return sorted(runs, key=lambda g: g.origin)


def total(runs: list[Goodput], name: str = "total") -> Goodput:
  """Several runs (a ladder's stages) summed: wall time is the sum of theirs (the gaps between stages are not
  counted)."""
  seconds = {b: sum(g.seconds[b] for g in runs) for b in ALL_BUCKETS}
  keys = ("steps", "lost_steps", "attempts", "restarts", "hangs", "preemptions")
  return Goodput(name=name, wall_s=sum(g.wall_s for g in runs), seconds=seconds,
                 **{k: sum(getattr(g, k) for g in runs) for k in keys}, median_step_s=float("nan"),
                 slow_steps=[s for g in runs for s in g.slow_steps], origin=min(g.origin for g in runs))


def table(runs: list[Goodput]) -> str:
  """Markdown: one column per run (and a total for several): hours and share of wall time in each bucket."""
  columns = runs + ([total(runs)] if len(runs) > 1 else [])
  lines = ["| | " + " | ".join(g.name for g in columns) + " |", "|---|" + "---|" * len(columns)]
  row = lambda label, cells: lines.append(f"| {label} | " + " | ".join(cells) + " |")   # noqa: E731
  row("**goodput**", [f"**{g.goodput:.1%}**" for g in columns])
  row("wall time (h)", [f"{g.wall_s / 3600:.3g}" for g in columns])
  for bucket in ALL_BUCKETS:
    row(f"{bucket} (h)", [f"{g.seconds[bucket] / 3600:.3g} ({g.seconds[bucket] / max(g.wall_s, 1e-9):.1%})"
                          for g in columns])
  row("steps computed (lost: recomputed)", [f"{g.steps} ({g.lost_steps} lost)" for g in columns])
  row("attempts (restarts, hangs, preemptions)", [f"{g.attempts} ({g.restarts}, {g.hangs}, {g.preemptions})"
                                                  for g in columns])
  row("median step (s)", [f"{g.median_step_s:.4g}" for g in columns])
  row("slow steps (> 3× the median): time over the median", [
      ", ".join(f"step {s}: +{extra:.3g} s" for s, _, extra in g.slow_steps[:5]) or "none" for g in columns])
  return "\n".join(lines) + "\n"


def plot(runs: list[Goodput], path: str | epath.Path, title: str = "") -> None:
  """A timeline: one lane per run, each second coloured by its bucket, hours since the first run's start."""
  from tokenformer_jax.report import new_figure, save_figure
  fig, ax = new_figure(1, figsize=(12, 1.2 + 0.6 * len(runs)))
  origin = min(g.origin for g in runs)
  for lane, g in enumerate(runs):
    for bucket in ALL_BUCKETS:
      bars = [((s - origin) / 3600, (e - s) / 3600) for s, e, b in g.segments if b == bucket]
      if bars and bucket != "unaccounted":
        ax.broken_barh(bars, (lane - 0.4, 0.8), facecolors=COLORS[bucket],
                       label=bucket if bucket not in ax.get_legend_handles_labels()[1] else None)
  ax.set_yticks(range(len(runs)), [f"{g.name} ({g.goodput:.0%})" for g in runs])
  ax.set_xlabel("hours since the start")
  ax.legend(fontsize=7, ncol=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
  fig.suptitle(title or "where the time went (goodput per run in brackets)", fontsize=10)
  save_figure(fig, path)


def write_goodput(paths, out: str | epath.Path, title: str = "") -> tuple[epath.Path, epath.Path, list[Goodput]]:
  """OUT/goodput.png and OUT/goodput.md for the runs and ladders in `paths`; also returns the runs."""
  runs = [g for p in paths for g in load(p)]
  out = epath.Path(out)
  png, md = out / "goodput.png", out / "goodput.md"
  plot(runs, png, title)
  heading = f"# {title}\n\n" if title else ""
  fileio.write_text(md, f"{heading}![timeline](goodput.png)\n\n{table(runs)}")
  return png, md, runs
