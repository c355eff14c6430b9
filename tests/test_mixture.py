"""Mixtures of token stores (data/mixture.py): the drawn proportions, the same windows for any number of hosts,
exact resume, a change of weights at a step, per-source validation, and bad input.

Three stores of the shipped corpus's documents, of very different sizes (`c` is small enough to go through several
epochs of its own), all made with the shipped tokenizer.
"""
from __future__ import annotations

import gzip
import json
import math
import re
import shutil

import numpy as np
import pytest

from helpers import TEST_RUN, assert_fails_with_one_line, losses, run_cli, run_main
from tokenformer_jax.config import SHIPPED_CORPUS, SHIPPED_TOKENIZER, DataConfig
from tokenformer_jax.data import mixture, prepare
from tokenformer_jax.data.errors import DataError
from tokenformer_jax.data.tokenizer import Tokenizer

WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}
SEQ_LEN, BATCH = 32, 8


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load(str(SHIPPED_TOKENIZER))


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tok):
  """{name: store path} of three stores of the shipped corpus's 60 documents: `c` holds 4 short ones."""
  root = tmp_path_factory.mktemp("mixture")
  with gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8") as f:
    docs = f.read().splitlines()
  paths = {}
  short = [0, 4, 5, 6]
  rest = [d for i, d in enumerate(docs) if i not in short]
  for name, part in (("a", rest[:28]), ("b", rest[28:]), ("c", [docs[i] for i in short])):
    (root / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    data = DataConfig(train_files=(str(root / f"{name}.jsonl"),), validation_fraction=0.25, seq_len=SEQ_LEN)
    paths[name] = str(root / "stores" / name)
    prepare.prepare(data, tok, paths[name], workers=0, progress=False)
  return paths


def mixture_data(stores, weights=WEIGHTS, **changes) -> DataConfig:
  return DataConfig(mixture=tuple(f"{stores[n]}={w}" for n, w in weights.items()), seq_len=SEQ_LEN, **changes)


def draw(data, tok, steps, *, hosts=1, state=None):
  """[(step, [(source, window id)] of its global batch in row order)] for `steps` steps, the hosts' rows merged
  (row r of host p is position r·P + p); `state`: a data position to start from."""
  iterators = [mixture.make_train_iterator(data, tok, global_batch=BATCH, process_index=p, process_count=hosts)
               for p in range(hosts)]
  for it in iterators:
    if state is not None:
      it.set_state(state)
  out = []
  for _ in range(steps):
    rows = [None] * BATCH
    for p, it in enumerate(iterators):
      batch = next(it)
      assert batch["tokens"].shape == (BATCH // hosts, SEQ_LEN + 1)
      rows[p::hosts] = list(zip(it.last_sources.tolist(), it.last_windows.tolist()))
    out.append(rows)
  return out, iterators[0]


def test_drawn_fractions_are_the_weights_and_the_same_for_one_two_and_four_hosts(stores, tok):
  data = mixture_data(stores)
  one, it = draw(data, tok, 2000 // BATCH)
  sources = np.asarray([s for rows in one for s, _ in rows])
  for s, (name, w) in enumerate(WEIGHTS.items()):
    f = np.mean(sources == s)
    assert abs(f - w) <= 3 * math.sqrt(w * (1 - w) / 2000), (name, f, w)
  consumed = it.consumed()
  assert [consumed[f"data/{n}/windows"] for n in WEIGHTS] == [np.sum(sources == s) for s in range(3)]
  assert consumed["data/c/epochs"] > 2   # the small source went round its own epochs
  for hosts in (2, 4):
    assert draw(data, tok, 40, hosts=hosts)[0] == one[:40], hosts


def test_no_source_gives_a_window_twice_within_its_epoch_and_a_resume_continues_exactly(stores, tok):
  data = mixture_data(stores)
  run, it = draw(data, tok, 120)
  sizes = {s: entry["windows"] for s, entry in enumerate(it.stream["sources"])}
  for s, size in sizes.items():
    drawn = [w for rows in run for source, w in rows if source == s]
    epochs = [drawn[e:e + size] for e in range(0, len(drawn), size)]
    assert all(len(set(epoch)) == len(epoch) for epoch in epochs), s
    if len(drawn) > size:   # a full epoch is a permutation of the source's windows
      assert sorted(epochs[0]) == list(range(size))
  partway, it = draw(data, tok, 50)
  state = json.loads(json.dumps(it.get_state()))   # as a checkpoint holds it
  assert draw(data, tok, 70, hosts=2, state=state)[0] == run[50:]
  reordered = DataConfig(mixture=tuple(reversed(data.mixture)), seq_len=SEQ_LEN)   # counts are per source, in order
  with pytest.raises(DataError, match="the stores, their order"):
    draw(reordered, tok, 1, state=state)


def test_a_change_of_weights_at_a_step_keeps_the_run_before_and_draws_the_new_weights_after(stores, tok):
  old, _ = draw(mixture_data(stores), tok, 300)
  staged = mixture_data(stores, mixture_stages=("40=0.1/0.1/0.8",))
  new, it = draw(staged, tok, 300)
  assert new[:40] == old[:40]
  after = np.asarray([s for rows in new[40:] for s, _ in rows])
  for s, w in enumerate((0.1, 0.1, 0.8)):
    assert abs(np.mean(after == s) - w) <= 3 * math.sqrt(w * (1 - w) / after.size), (s, np.mean(after == s))
  sizes = [entry["windows"] for entry in it.stream["sources"]]
  for s, size in enumerate(sizes):   # each source went on from its own position: nothing drawn twice in an epoch
    drawn = [w for rows in new for source, w in rows if source == s]
    assert all(len(set(drawn[e:e + size])) == len(drawn[e:e + size]) for e in range(0, len(drawn), size))
  # The same change made on resume at step 40 (a config edited between jobs) draws the same, and says so.
  _, it = draw(mixture_data(stores), tok, 40)
  state = it.get_state()
  resumed, it = draw(mixture_data(stores, {"a": 1, "b": 1, "c": 8}), tok, 260, state=state)
  assert resumed == new[40:]
  assert it.changes == ["mixture weights changed on resume at step 40: 0.5/0.3/0.2 → 0.1/0.1/0.8 (each source "
                        "goes on from its own position)"]


def test_a_source_that_runs_out_is_an_error_when_asked(stores, tok):
  data = mixture_data(stores, mixture_exhausted="error")
  size = mixture.make_train_iterator(data, tok, global_batch=BATCH).stream["sources"][2]["windows"]
  repeating, _ = draw(mixture_data(stores), tok, 100)
  c_drawn = np.cumsum([sum(s == 2 for s, _ in rows) for rows in repeating])
  step = int(np.argmax(c_drawn > size)) + 1   # the first step that needs window size + 1 of c
  with pytest.raises(DataError, match=re.escape(f"mixture source 'c' ran out of windows at step {step} (its "
                                                f"{size} windows drawn once)")):
    draw(data, tok, 100)


def test_bad_mixtures_are_one_line_each(stores, tmp_path):
  cases = {("x=0", "y=0"): "weights sum to 0: they must sum to a positive number",
           (f"{stores['a']}=0.5", f"{tmp_path}/other/a=0.5"): "names a twice",
           (f"{stores['a']}=-1",): "must be a finite number >= 0",
           ("gs://bucket/store",): "must look like STORE=WEIGHT"}
  for entries, phrase in cases.items():
    with pytest.raises(DataError, match=phrase):
      DataConfig(mixture=entries).validate()
  with pytest.raises(DataError, match="has 2 weights, but data.mixture has 3 sources"):
    mixture_data(stores, mixture_stages=("5=1/2",)).validate()
  with pytest.raises(ValueError, match="data.mixture_stages is set but data.mixture is empty"):
    DataConfig(mixture_stages=("5=1/2",)).validate()


@pytest.fixture(scope="module")
def mixed_run(stores, tmp_path_factory):
  """(workdir, result) of test_run trained uninterrupted on the mixture, by cli.train."""
  workdir = tmp_path_factory.mktemp("mixed_run")
  result = run_cli("tokenformer_jax.cli.train", TEST_RUN, f"--workdir={workdir}", *mixture_flags(stores))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def mixture_flags(stores) -> tuple[str, ...]:
  return ("--set=data.mixture=" + ",".join(f"{stores[n]}={w}" for n, w in WEIGHTS.items()),)


@pytest.mark.slow
def test_training_reports_each_source_and_a_killed_run_resumes_bitwise(stores, mixed_run, tmp_path):
  workdir, result = mixed_run
  lines = [line for line in result.stdout.splitlines() if line.startswith("step") and "validation loss" in line]
  assert len(lines) == 2 and all("(weighted)" in line and all(f" | {n} " in line for n in WEIGHTS)
                                 for line in lines), result.stdout[-2000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  final = next(r for r in reversed(records) if "eval/loss" in r)
  assert final["step"] == 12
  assert final["eval/loss"] == pytest.approx(sum(w * final[f"eval/{n}/loss"] for n, w in WEIGHTS.items()), rel=1e-6)
  consumed = next(r for r in reversed(records) if "data/a/windows" in r)
  assert consumed["step"] == 12 and sum(consumed[f"data/{n}/windows"] for n in WEIGHTS) == 12 * 8
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator   # what TensorBoard reads
  events = EventAccumulator(str(workdir / "tensorboard")).Reload()
  for n in WEIGHTS:
    scalars = events.Scalars(f"eval/{n}/loss")
    assert [s.step for s in scalars] == [6, 12] and scalars[-1].value == pytest.approx(final[f"eval/{n}/loss"])
  killed = tmp_path / "killed"
  first = run_cli("tokenformer_jax.cli.train", TEST_RUN, f"--workdir={killed}", *mixture_flags(stores),
                  script=("tests/train_with_fault.py", "SIGKILL", "6"))
  assert first.returncode == -9, first.stderr[-2000:]
  again = run_cli("tokenformer_jax.cli.train", TEST_RUN, f"--workdir={killed}", *mixture_flags(stores))
  assert again.returncode == 0 and "resumed" in again.stdout, again.stderr[-2000:]
  assert losses(killed) == losses(workdir)   # every step's loss, bitwise
  assert losses(killed, "eval/c/loss") == losses(workdir, "eval/c/loss")


@pytest.mark.slow
def test_the_report_draws_each_source_and_each_task(mixed_run, trained_run, tmp_path, capsys):
  """cli.report over a mixture run and a run with eval.tasks: series.png and a table of each series' last value."""
  from tokenformer_jax.cli import report as cli
  workdir, _ = mixed_run
  assert run_main(cli, capsys, str(workdir), str(trained_run), f"--out={tmp_path}")[0] == 0
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  final = next(r for r in reversed(records) if "eval/loss" in r)
  tasks = next(json.loads(line) for line in reversed((trained_run / "metrics.jsonl").read_text().splitlines())
               if "task/seconds" in line)
  text = (tmp_path / "report.md").read_text()
  header, _, mixed, tasked = [line for line in text.split("## Per source")[1].splitlines() if line.startswith("|")]
  names = [cell.strip() for cell in header.strip("|").split("|")][1:]
  assert names == [*(f"eval/{n}/loss" for n in sorted(WEIGHTS)), "task/heldout/loss", "task/heldout/perplexity",
                   "task/tokenformer_local_mc/acc"]
  cells = dict(zip(names, [cell.strip() for cell in mixed.strip("|").split("|")][1:]))
  assert all(float(cells[f"eval/{n}/loss"]) == pytest.approx(final[f"eval/{n}/loss"], rel=1e-3) for n in WEIGHTS)
  cells = dict(zip(names, [cell.strip() for cell in tasked.strip("|").split("|")][1:]))
  assert float(cells["task/tokenformer_local_mc/acc"]) == pytest.approx(tasks["task/tokenformer_local_mc/acc"])
  assert cells["eval/a/loss"] == "" and (tmp_path / "series.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_missing_store_or_another_tokenizer_is_one_line(stores, tmp_path):
  missing = run_cli("tokenformer_jax.cli.train", TEST_RUN, f"--workdir={tmp_path / 'm'}",
                    f"--set=data.mixture={stores['a']}=1,{tmp_path}/nowhere=1")
  assert_fails_with_one_line(missing, f"{tmp_path}/nowhere")
  other = tmp_path / "other"
  shutil.copytree(stores["b"], other)
  manifest = json.loads((other / "manifest.json").read_text())
  manifest["tokenizer_fingerprint"] = "0" * len(manifest["tokenizer_fingerprint"])
  (other / "manifest.json").write_text(json.dumps(manifest))
  result = run_cli("tokenformer_jax.cli.train", TEST_RUN, f"--workdir={tmp_path / 't'}",
                   f"--set=data.mixture={stores['a']}=1,{other}=1")
  assert_fails_with_one_line(result, "tokenized with another tokenizer")
  assert not (tmp_path / "m").exists() and not (tmp_path / "t").exists()


def test_the_launcher_checks_every_store_of_a_mixture():
  from launch.vm import check_tpu_data, data_urls
  from experiments.demo import test_run
  cfg = test_run.replace(data=test_run.data.replace(
      tokenizer="gs://b/tok.model", mixture=("gs://b/stores/web=0.7", ("code", "gs://b/stores/code-v2", 0.3))))
  assert data_urls(cfg) == [("tokenizer", "gs://b/tok.model"), ("mixture store web", "gs://b/stores/web"),
                            ("mixture store code", "gs://b/stores/code-v2")]
  check_tpu_data(cfg, "stage s")
  local = cfg.replace(data=cfg.data.replace(mixture=("gs://b/stores/web=0.7", "/home/me/code=0.3")))
  with pytest.raises(ValueError, match="stage s: the mixture's store '/home/me/code' .source code. is not on GCS"):
    check_tpu_data(local, "stage s")


MIXED_LADDER = """
import dataclasses
from experiments.ladder import TINY

def _on_tpu(stage, *mixture):
  data = stage.config.data.replace(mixture=mixture, tokenizer="gs://b/tok.model")
  return dataclasses.replace(stage, config=stage.config.replace(data=data), accelerator="v4-8")

MIXED = (_on_tpu(TINY[0], "gs://b/stores/web=0.7", "gs://b/stores/code=0.3"),
         _on_tpu(TINY[1], "gs://b/stores/web=0.2", "{second}=0.8"))
tiny_0, tiny_1 = (s.config for s in MIXED)
"""


@pytest.mark.parametrize("second", ["gs://b/stores/books", "/home/me/books"])
def test_each_ladder_stage_has_its_own_mixture_and_the_preflight_checks_every_store(tmp_path, second):
  from launch.ladder import check_ladder, load_stages
  path = tmp_path / "mixed_ladder.py"
  path.write_text(MIXED_LADDER.format(second=second))
  _, stages = load_stages(f"{path}:MIXED", ["eval_every=7"])
  assert [s.config.data.mixture for s in stages] == [
      ("gs://b/stores/web=0.7", "gs://b/stores/code=0.3"), ("gs://b/stores/web=0.2", f"{second}=0.8")]
  assert all(s.config.eval_every == 7 for s in stages)   # --set reaches every stage; the mixtures stay their own
  shipped = "experiments/ladder.py"   # where the tpu backend needs the file (checked apart from the stages)
  if second.startswith("gs://"):
    check_ladder(stages, "tpu", shipped)
  else:
    with pytest.raises(ValueError, match="stage tiny_1: the mixture's store '/home/me/books' .source books. is not"):
      check_ladder(stages, "tpu", shipped)


@pytest.mark.slow   # lm_eval indexes its own ~15,000 tasks to say that one is not among them (7 s)
def test_eval_tasks_and_tracker_refuse_bad_entries_in_one_line(tmp_path):
  """eval.tasks (train/evals.py): a malformed entry, a name given twice, an lm_eval task that does not exist; a
  malformed logging.wandb or mode."""
  from tokenformer_jax.config import EvalConfig, task_name
  from tokenformer_jax.train.evals import lm_eval_task_manager, task_metrics
  with pytest.raises(ValueError, match="must be ppl:PATH"):
    EvalConfig(tasks=("perplexity:x.txt",)).validate()
  with pytest.raises(ValueError, match="names heldout twice"):
    EvalConfig(tasks=("ppl:a/heldout.txt", "ppl:b/heldout.jsonl.gz")).validate()
  assert task_name("ppl:gs://bucket/stores/web/") == "web" and task_name("lm_eval:piqa") == "piqa"
  with pytest.raises(ValueError, match="no task no_such_task"):
    lm_eval_task_manager(["no_such_task"], "tests/lm_eval_task")
  from tokenformer_jax.config import LoggingConfig
  with pytest.raises(ValueError, match="PROJECT or PROJECT/ENTITY"):
    LoggingConfig(wandb="a/b/c").validate()
  with pytest.raises(ValueError, match="wandb_mode must be one of online, offline"):
    LoggingConfig(wandb="p", wandb_mode="disabled").validate()
  results = {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "t", "sample_len": 8, "exact_match,strict-match": 1.0}
  assert task_metrics(results) == {"acc": 0.5, "exact_match_strict-match": 1.0}
