"""Evaluations during training besides the validation loss: the config's `eval.tasks` (docs/training.md).

Every `eval.every` steps (0: with the validation loss, every `eval_every`) and at the last step:
- "ppl:PATH": loss and perplexity over a corpus (all the documents of its files) or over a token store's
  validation split, cut into the validation loss's windows and run through the same jitted eval step, sharded over
  the mesh on every process as the validation loss is. The windows are prepared once, when the run starts.
- "lm_eval:TASK": an lm-evaluation-harness task through this package's adapter (inference/lm_eval_adapter.py),
  scoring with the parameters of that step. Every process runs the same requests in lockstep (each scoring batch
  is one computation over the whole mesh) and process 0 writes the results. Nothing downloads
  (HF_DATASETS_OFFLINE is set): a task's data must be local files, as tests/lm_eval_task/ shows.

Their results join the metrics (console, TensorBoard, metrics.jsonl, the tracker) as task/<name>/<metric>
(loss and perplexity of a corpus; lm_eval's metrics of a task, such as acc and acc_norm), and the seconds they took
as task/seconds, said on the console too.
"""
from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable

from tokenformer_jax.config import TrainConfig, task_name
from tokenformer_jax.data import pipeline
from tokenformer_jax.data.sources import names_files


class Evals:
  """The run's eval.tasks: their data ready, and `run(...)` evaluates them all at a step."""

  def __init__(self, cfg: TrainConfig, tokenizer, *, process_index: int, process_count: int):
    self.cfg, self.tokenizer = cfg, tokenizer
    self.every = cfg.eval.every or cfg.eval_every
    self.corpora: dict[str, list] = {}
    self.lm_tasks = [task.partition(":")[2] for task in cfg.eval.tasks if task.startswith("lm_eval:")]
    from tokenformer_jax.inference.evaluate import eval_data   # (it imports the train package)
    for task in cfg.eval.tasks:
      kind, _, path = task.partition(":")
      if kind == "ppl":
        is_files = names_files(path)
        data, split = eval_data(cfg.data, files=(path,) if is_files else (), store="" if is_files else path)
        self.corpora[task_name(task)] = pipeline.make_eval_batches(
            data, tokenizer, global_batch=cfg.global_batch, max_batches=cfg.eval.batches or cfg.eval_batches,
            process_index=process_index, process_count=process_count, split=split)
    self.task_manager = lm_eval_task_manager(self.lm_tasks, cfg.eval.include_path) if self.lm_tasks else None

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.cfg.steps

  def run(self, run, params, step: int, loss_of: Callable[[list], dict]) -> dict[str, float]:
    """{task/<name>/<metric>: value, task/seconds: s} at `step`; `loss_of(batches)`: the validation loss's
    metrics of those batches (train.loop.evaluate)."""
    started, metrics = time.time(), {}
    for name, batches in self.corpora.items():
      result = loss_of(batches)
      metrics.update({f"task/{name}/loss": result["eval/loss"], f"task/{name}/perplexity": result["eval/perplexity"]})
    if self.lm_tasks:
      metrics.update(self.lm_eval(run, params, step))
    metrics["task/seconds"] = time.time() - started
    return metrics

  def lm_eval(self, run, params, step: int) -> dict[str, float]:
    import lm_eval   # pylint: disable=g-import-not-at-top (the optional eval extra)
    from tokenformer_jax.inference.lm_eval_adapter import TokenFormerLM
    from tokenformer_jax.inference.loading import LoadedModel
    model = LoadedModel(self.cfg, params, run.shardings.params, run.mesh, self.tokenizer, step, "")
    with contextlib.redirect_stderr(io.StringIO()):   # lm_eval's progress bars: not on the training console
      out = lm_eval.simple_evaluate(model=TokenFormerLM(model=model), tasks=self.lm_tasks, limit=self.cfg.eval.limit
                                    or None, task_manager=self.task_manager, log_samples=False, bootstrap_iters=0)
    return {f"task/{task}/{metric}": value for task, results in out["results"].items()
            for metric, value in task_metrics(results).items()}


def describe(metrics: dict[str, float]) -> str:
  """One console line of `run`'s results: each task's main numbers and the time they took."""
  parts = []
  for key, value in metrics.items():
    _, name, metric = (key.split("/", 2) + [""])[:3]
    if metric in ("perplexity", "acc", "acc_norm", "exact_match", "word_perplexity"):
      parts.append(f"{name} {metric} {value:.4g}")
  return f"tasks: {' | '.join(parts)} ({metrics['task/seconds']:.1f} s)"


def task_metrics(results: dict) -> dict[str, float]:
  """lm_eval's results of one task ({"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}) → {"acc": 0.5}: its
  numbers, a filter other than "none" kept as a suffix (acc_strict-match), standard errors and the count of
  documents (sample_len) left out."""
  metrics = {}
  for key, value in results.items():
    metric, _, applied = key.partition(",")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and "_stderr" not in metric and metric != "sample_len":
      metrics[metric if applied in ("", "none") else f"{metric}_{applied}"] = float(value)
  return metrics


def lm_eval_task_manager(tasks: list[str], include_path: str):
  """lm_eval's TaskManager over its own tasks and `include_path`'s, offline; ValueError naming unknown tasks."""
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # nothing downloads during training
  try:
    from lm_eval.tasks import TaskManager   # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ValueError(f"eval.tasks has lm_eval tasks but lm-evaluation-harness is not importable ({error}); "
                     "pip install -e '.[eval]'") from None
  if include_path and not os.path.isdir(include_path):
    raise ValueError(f"eval.include_path={include_path!r} is not a directory of lm_eval task files")
  # include_path's tasks alone first: indexing lm_eval's own ~15,000 takes 7 s here, needed only for one of those.
  manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
  if manager is None or any(task not in manager.all_tasks for task in tasks):
    manager = TaskManager(include_path=include_path or None)
  if unknown := [task for task in tasks if task not in manager.all_tasks]:
    raise ValueError(f"eval.tasks: lm_eval has no task {', '.join(unknown)}"
                     f"{' (nor has ' + include_path + ')' if include_path else ''}; set eval.include_path to the "
                     "directory of its .yaml file")
  return manager
