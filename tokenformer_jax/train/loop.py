"""The training loop, top to bottom: mesh → data → state (resumed, initialised from another run, or fresh)
→ jitted step → loop with logging, evaluation, checkpoints and preemption.

Resuming is exact: parameters, optimizer state, step and the data iterator's position are all restored
(the step has no randomness of its own: there is no dropout), so a resumed run computes the same losses, also
on a job of another shape (more or fewer hosts and devices, another mesh preset): the global batch and the next
windows stay, the state is re-sharded as it is read, and grad_accum adapts (setup.fit_to_job).
"""
from __future__ import annotations

import math
import signal
import time

import jax
import numpy as np
from etils import epath

from tokenformer_jax import sharding
from tokenformer_jax.checkpoint import CheckpointError, RunCheckpoints, describe_shape, job_shape, say_once_per_job
from tokenformer_jax.checkpoint_local import LocalTier, agreed_step, gather_offers
from tokenformer_jax.config import ModelConfig, TrainConfig, flops_per_token, from_dict, to_dict
from tokenformer_jax.data import mixture
from tokenformer_jax.data.pipeline import make_eval_batches, make_train_iterator
from tokenformer_jax.data.tokenizer import Tokenizer
from tokenformer_jax.growth import start_from_grown
from tokenformer_jax.run import RunDir, vocabulary_mismatch
from tokenformer_jax.train import evals, steps
from tokenformer_jax.train.events import RunEvents
from tokenformer_jax.train.guard import SpikeGuard
from tokenformer_jax.train.logger import MetricsLogger, WandbSink, format_duration, peak_flops_per_device
from tokenformer_jax.train.optimizer import adam_moments, ema_params
from tokenformer_jax.train.setup import Run, build_run, fit_to_job


class TrainingError(RuntimeError):
  """Training cannot go on (a NaN loss, a workdir of another model, ...); the message says what to do."""


class StopSignal:
  """Turns SIGTERM (how TPU VMs announce preemption) into a flag the loop checks after every step."""

  def __init__(self):
    self.requested = False
    self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def everywhere(self) -> bool:
    """Every host stops at the same step when any host was asked to."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

  def restore(self):
    signal.signal(signal.SIGTERM, self.previous)


def check_same_model(saved: dict, cfg: TrainConfig, workdir) -> None:
  saved_model, model = saved.get("model", {}), to_dict(cfg.model)
  if saved_model:   # fields added since it was saved count at their defaults
    saved_model = to_dict(from_dict(ModelConfig, saved_model))
  differing = sorted(k for k in set(saved_model) | set(model) if saved_model.get(k) != model.get(k))
  if differing:
    details = ", ".join(f"{k}: {saved_model.get(k)!r} there, {model.get(k)!r} here" for k in differing[:4])
    raise TrainingError(f"{workdir} holds a checkpoint of a different model ({details}); use a new --workdir, "
                        "or --init_from to start from its parameters")


def evaluate(run: Run, params, batches, weights: dict[str, float] | None = None) -> dict[str, float]:
  """Validation metrics; for a mixture (`batches`: {source: its batches}) each source's loss as
  `eval/<source>/loss` and `eval/loss` their total weighted by `weights`, the mixture's weights now."""
  if isinstance(batches, dict):
    losses = {name: evaluate(run, params, source)["eval/loss"] for name, source in batches.items()}
    total = sum(weights[name] * loss for name, loss in losses.items())
    return {"eval/loss": total, "eval/perplexity": math.exp(min(total, 50.0)),
            **{f"eval/{name}/loss": loss for name, loss in losses.items()}}
  sums = steps.LossSums()
  for batch in batches:
    sums.add(run.eval_step(params, run.to_global(batch)))
  if run.config.model.vision is not None:   # an image classifier: loss, top-1 and top-5 over the test images
    return {"eval/loss": sums.mean, **{f"eval/{k}": v for k, v in sums.rates.items()}}
  return {"eval/loss": sums.mean, "eval/perplexity": math.exp(min(sums.mean, 50.0))}


def describe_eval(metrics: dict[str, float]) -> str:
  if "eval/top1" in metrics:
    return (f"test loss {metrics['eval/loss']:.4f} | top-1 {metrics['eval/top1']:.2%} | "
            f"top-5 {metrics['eval/top5']:.2%}")
  sources = [(k.split("/")[1], v) for k, v in metrics.items() if k.startswith("eval/") and k.count("/") == 2]
  per_source = "".join(f" | {name} {loss:.4f}" for name, loss in sources)
  weighted = " (weighted)" if sources else ""
  return (f"validation loss {metrics['eval/loss']:.4f}{weighted} | perplexity {metrics['eval/perplexity']:.2f}"
          f"{per_source}")


def saved_job(workdir) -> dict | None:
  """{"config", "job"} of the newest checkpoint in `workdir`, the shape a resume adapts from; None without one
  (or when it cannot be read: resuming then falls back past it and says so)."""
  if not RunDir(workdir).has_checkpoints():
    return None
  checkpoints = RunCheckpoints(workdir, read_only=True)
  try:
    step = checkpoints.latest_step()
    return None if step is None else {"config": checkpoints.read_json(step), "job": checkpoints.written_by(step) or {}}
  except CheckpointError:
    return None
  finally:
    checkpoints.close()


def state_tree(run_or_state) -> dict:
  """The state as both checkpoint tiers save it: {"params", "opt_state": {"step", "opt_state"}} (of a TrainState,
  or of a Run's abstract state)."""
  state = getattr(run_or_state, "abstract", run_or_state)
  return {"params": state.params, "opt_state": {"step": state.step, "opt_state": state.opt_state}}


def resumed_locally(run: Run, checkpoints: RunCheckpoints, train_batches,
                    local: LocalTier) -> tuple[steps.TrainState, str] | None:
  """The host-local tier's newest step that every host holds whole, if none older than the newest persistent
  checkpoint (checkpoint_local.py); None → the persistent tier (saying why, when some host had a local step)."""
  abstract, persistent = state_tree(run), checkpoints.latest_step()
  offers = gather_offers(local.offers(abstract))
  step = agreed_step(offers, persistent)
  newest = ", ".join(str(o[0]) if o else "none" for o in offers)
  if step is None:
    if any(offers):
      say_once_per_job(f"host-local checkpoints not used (each host's newest whole step: {newest}; the newest "
                       f"persistent one: {persistent}); restoring the persistent checkpoint")
    return None
  check_same_model(local.manifest(step)["config"], run.config, checkpoints.directory.parent)
  restored = local.restore(step, abstract)
  if restored is None:
    say_once_per_job(f"host-local checkpoint {step} does not match the checksums saved with it; restoring the "
                     "persistent checkpoint")
    return None
  tree, position, _ = restored
  train_batches.set_state(position)
  state = steps.TrainState(step=tree["opt_state"]["step"], params=tree["params"],
                           opt_state=tree["opt_state"]["opt_state"])
  return state, (f"resumed {checkpoints.directory.parent} at step {step} from the host-local checkpoints "
                 f"({local.directory}; each host's newest whole step: {newest}; the newest persistent one: "
                 f"{persistent})")


def starting_state(run: Run, checkpoints: RunCheckpoints, train_batches,
                   init_from: str | None) -> tuple[steps.TrainState, str]:
  """Resume the workdir's newest good checkpoint (past broken ones), else take --init_from's parameters, else
  start fresh."""
  latest, params, rest = checkpoints.restore_newest(
      run.abstract.params, {"step": run.abstract.step, "opt_state": run.abstract.opt_state}, train_batches,
      check_config=lambda saved: check_same_model(saved, run.config, checkpoints.directory.parent))
  if latest is not None:
    state = steps.TrainState(step=rest["step"], params=params, opt_state=rest["opt_state"])
    written, here = checkpoints.written_by(latest), job_shape()
    other = f" (saved by a job of {describe_shape(written)}; this one: {describe_shape(here)})" if (
        written and written != here) else ""
    return state, f"resumed {checkpoints.directory.parent} at step {latest}{other}"
  if init_from:
    return initialised_from(run, init_from)
  return run.init_state(), f"new run in {checkpoints.directory.parent}"


def initialised_from(run: Run, init_from: str) -> tuple[steps.TrainState, str]:
  """--init_from's parameters with a fresh optimizer; from a checkpoint grown with `cli.grow --optimizer=carry`,
  with the AdamW moments carried in it instead of zeros: mu, nu (zeros for the new tokens) and Adam's step
  count as the source left it. That count only sets the bias correction 1 / (1 - b^count): the moments are
  already warmed up, so it is kept (reset to 0, the first updates would be up to 1 / (1 - b1) = 10× too
  large). The learning-rate schedule, whose count is separate, and the run's step start at 0 either way: the
  grown run's own warmup, peak and decay."""
  source = RunDir(init_from)
  params = source.checkpoints.restore_params(run.abstract.params)
  grown = source.provenance()
  if grown is None or grown.optimizer != "carry":
    return run.init_state(params), f"initialised parameters from {init_from}; fresh optimizer and schedule"
  moments = source.checkpoints.restore_moments(adam_moments(run.abstract.opt_state))
  count = int(jax.device_get(moments["count"]))
  return run.init_state(params, moments), (
      f"initialised parameters from {init_from} and carried its AdamW moments (mu and nu of the source at step "
      f"{grown.source_step}, zeros for the new tokens; bias-correction count {count} kept); the schedule starts "
      "at step 0")


def origin(init_from: str | None) -> dict | None:
  """Where --init_from's checkpoint came from, for the tracker: its path and how it was made (a grown
  checkpoint's provenance, an imported one's source), or None without --init_from."""
  if not init_from:
    return None
  with RunDir(init_from) as source:
    record = source.record()
  return {"checkpoint": str(init_from), **(record.to_json() if record is not None else {})}


def roll_back(run: Run, checkpoints: RunCheckpoints, train_batches, guard: SpikeGuard, step: int,
              log: MetricsLogger) -> tuple[steps.TrainState, int]:
  """The spike guard's last resort: the newest checkpoint (parameters, optimizer, data position) at a halved
  learning rate; (state, its step)."""
  checkpoints.wait()
  latest = checkpoints.latest_step()
  if latest is None:
    raise TrainingError(f"the loss spiked {guard.patience} times in a row at step {step}, before the first "
                        "checkpoint: lower optim.learning_rate or save earlier (checkpoint_every)")
  state, _ = starting_state(run, checkpoints, train_batches, None)   # (past a broken newest one, if need be)
  restored = int(jax.device_get(state.step))
  log.say(guard.rolled_back(step, restored))
  return state, restored


def make_batches(cfg: TrainConfig):
  """(this host's train iterator, its evaluation batches): token windows of the corpus or store for a language
  model (after the one vocabulary check), the fixed train and test splits of its images for an image classifier."""
  host = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if cfg.model.vision is not None:
    from tokenformer_jax.data import images   # pylint: disable=g-import-not-at-top (the optional vision extra)
    where = dict(global_batch=cfg.global_batch, model_name=cfg.model.name, **host)
    return (images.make_train_iterator(cfg.data, cfg.model.vision, seed=cfg.data.shuffle_seed, **where),
            images.eval_batches(cfg.data, cfg.model.vision, max_batches=cfg.eval_batches, **where))
  tokenizer = Tokenizer.load(cfg.data.tokenizer)
  if (mismatch := vocabulary_mismatch(tokenizer, cfg, trained=False)) is not None:
    raise TrainingError(mismatch)
  if cfg.data.mixture:   # several stores by weight (data/mixture.py); evaluation per source
    where = dict(global_batch=cfg.global_batch, **host)
    return (mixture.make_train_iterator(cfg.data, tokenizer, seed=cfg.data.shuffle_seed, **where),
            mixture.make_eval_batches(cfg.data, tokenizer, max_batches=cfg.eval_batches, **where))
  return (make_train_iterator(cfg.data, tokenizer, global_batch=cfg.global_batch, seed=cfg.data.shuffle_seed, **host),
          make_eval_batches(cfg.data, tokenizer, global_batch=cfg.global_batch, max_batches=cfg.eval_batches, **host))


class Throughput:
  """The console's and the metrics' view of the steps since the last report: losses checked finite, every step's
  metrics written, tokens/s, MFU and the ETA of the steps still to go."""

  def __init__(self, cfg: TrainConfig, devices: int, first_step: int):
    self.cfg, self.devices, self.first_step = cfg, devices, first_step
    self.tokens_per_step = cfg.global_batch * cfg.example_tokens   # an image's tokens: its patches (and class token)
    self.flops_per_step = flops_per_token(cfg.model, cfg.example_tokens) * self.tokens_per_step
    self.peak = peak_flops_per_device()
    self.started = time.time()
    self.restart()

  def restart(self) -> None:
    """A new window: after an evaluation and a save, so that they do not count as step time."""
    self.window_start, self.window_steps = time.time(), 0

  def report(self, log: MetricsLogger, fetched: list[tuple[int, dict]], step: int, last_saved) -> None:
    """Check, write and show the window's steps (`fetched`: their metrics, on the host)."""
    for s, m in fetched:
      if not math.isfinite(float(m["loss"])):
        raise TrainingError(f"the loss is {float(m['loss'])} at step {s}: stopped without saving (the last "
                            f"checkpoint is step {last_saved}); lower optim.learning_rate or check the data")
    seconds = time.time() - self.window_start
    tokens_per_second = self.window_steps * self.tokens_per_step / seconds
    mfu = self.flops_per_step * self.window_steps / seconds / (self.peak * self.devices) if self.peak else None
    for s, m in fetched:
      log.write(s, {f"train/{k}": v for k, v in m.items() if k != "targets"})
    log.write(step, {"train/tokens_per_second": tokens_per_second, "train/mfu": mfu})
    m, steps_total = fetched[-1][1], self.cfg.steps
    eta = (time.time() - self.started) / max(step - self.first_step, 1) * (steps_total - step)
    log.progress(f"step {step:>7}/{steps_total} | loss {float(m['loss']):.4f} | "
                 f"lr {float(m['learning_rate']):.2e} | grad norm {float(m['grad_norm']):.3f} | "
                 f"{tokens_per_second / 1e3:.1f}k tok/s | MFU {f'{mfu:.1%}' if mfu is not None else 'n/a'} | "
                 f"eta {format_duration(eta)}")


def train(cfg: TrainConfig, workdir: str, *, init_from: str | None = None) -> dict[str, float]:
  """Train (or resume) the run in `workdir`; returns the final evaluation metrics.

  (Over 60 lines on purpose: it reads top to bottom in the order a run starts and a step happens, as big_vision's
  train.py does; the parts that stand alone — the data, the starting state, a rollback, the throughput window,
  the evaluation — are the functions above it.)"""
  cfg.validate()   # every value in range before anything is read or written
  sharding.initialize_distributed()   # several hosts: join the others before anything touches devices
  workdir = epath.Path(workdir)
  writer = jax.process_index() == 0
  cfg, trainable_rows, notes = start_from_grown(cfg, init_from)   # a grown checkpoint's norm scale and new rows
  data_parallel = math.prod(sharding.mesh_shape(cfg.mesh, jax.device_count())[:2])
  cfg, fitted = fit_to_job(cfg, data_parallel, jax.process_count(), saved_job(workdir))   # another job shape
  notes = [*notes, fitted] if fitted else notes
  run = build_run(cfg, trainable_rows=trainable_rows)              # mesh → optimizer → shardings → jitted steps
  mesh = run.mesh

  train_batches, eval_batches = make_batches(cfg)
  tasks = evals.Evals(cfg, Tokenizer.load(cfg.data.tokenizer), process_index=jax.process_index(),
                      process_count=jax.process_count()) if cfg.eval.tasks else None   # eval.tasks: data ready
  checkpoints = RunCheckpoints(workdir, keep=cfg.keep_checkpoints)
  local = LocalTier(cfg.local_checkpoint_dir, workdir, every=cfg.local_checkpoint_every,
                    keep=cfg.keep_local_checkpoints) if cfg.local_checkpoint_dir else None
  restore_started = time.time()
  resumed = resumed_locally(run, checkpoints, train_batches, local) if local is not None else None
  state, how = resumed or starting_state(run, checkpoints, train_batches, init_from)
  restore = (restore_started, time.time())   # for the event log
  # The step resumed: the local one, or the newest good persistent one (broken newer ones were moved aside).
  latest = int(jax.device_get(state.step)) if resumed else checkpoints.latest_step()
  tracker = WandbSink(cfg.logging.wandb, cfg.logging.wandb_mode, workdir, to_dict(cfg),
                      origin(init_from)) if writer and cfg.logging.wandb else None
  log = MetricsLogger(workdir, enabled=writer, tracker=tracker)   # only now: a refused run leaves it untouched
  mixed = isinstance(train_batches, mixture.MixtureIterator)
  weights = lambda: train_batches.current_weights() if mixed else None   # noqa: E731 (a mixture's, for the eval)
  for line in [how, *notes, *(train_batches.changes if mixed else [])]:
    log.say(line)
  if log.library_log:
    log.say(f"library log lines go to {log.library_log} (--verbosity=0 shows them here instead)")
  if writer:
    RunDir(workdir).write_config(cfg)

  config_json = to_dict(cfg)
  stop = StopSignal()

  def save(step: int):
    tree = state_tree(state)
    checkpoints.save(step, params=tree["params"], opt_state=tree["opt_state"], data_iterator=train_batches,
                     config=config_json)

  guard = SpikeGuard(cfg.optim, workdir, writer=writer) if cfg.optim.spike_guard else None
  step = int(jax.device_get(state.step))
  if step >= cfg.steps:
    log.say(f"the run is complete: {workdir} already holds step {step} of steps={cfg.steps}; its checkpoint is "
            f"{checkpoints.directory / str(latest)} (to train further, raise steps: --set steps=N)")
  else:
    log.say(f"training {cfg.model.name} ({sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f}M "
            f"parameters) from step {step} to {cfg.steps} on {mesh.devices.size} {jax.devices()[0].platform} "
            f"device(s), {cfg.global_batch * cfg.example_tokens} tokens per step")
  pending: list[tuple[int, dict]] = []
  throughput, last_saved = Throughput(cfg, mesh.devices.size, int(latest or 0)), latest
  final: dict[str, float] = {}
  events = RunEvents(workdir, cfg.diagnostics, writer=writer, library_log=log.library_log)   # RUN/events.jsonl
  events.started(restore, latest, loop_start=time.time(), **({"tier": "local"} if resumed else {}))
  try:
    while step < cfg.steps:
      events.begin("step", step + 1, wait=state)
      batch = run.to_global(next(train_batches))
      events.data_ready()
      if guard is None:
        state, metrics = run.train_step(state, batch)
      else:
        threshold = guard.threshold()
        state, metrics = run.train_step(state, batch, np.float32(threshold), np.float32(guard.lr_scale))
      step += 1
      if guard is not None:
        verdict = guard.observe(step, float(metrics["loss"]), bool(metrics["skipped"]), threshold)
        if verdict == "rollback":
          events.begin("checkpoint_restore", step)
          state, step = roll_back(run, checkpoints, train_batches, guard, step, log)
          continue
        if verdict:
          log.say(verdict)
      throughput.window_steps += 1
      pending.append((step, metrics))
      stopping = stop.everywhere()
      evaluating = step % cfg.eval_every == 0 or step == cfg.steps
      tasks_due = tasks is not None and tasks.due(step)
      saving = step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping
      logging_now = step % cfg.log_every == 0 or evaluating or tasks_due or saving
      if logging_now:
        throughput.report(log, jax.device_get(pending), step, last_saved)
        pending = []
        if mixed:
          log.write(step, train_batches.consumed())   # windows and epochs each source has given
      if evaluating:
        events.begin("eval", step)
        final = evaluate(run, state.params, eval_batches, weights())
        log.write(step, final)
        log.say(f"step {step:>7}/{cfg.steps} | {describe_eval(final)}")
        if (ema := ema_params(state.opt_state)) is not None:   # optim.ema_decay: the averaged weights too
          averaged = evaluate(run, ema, eval_batches, weights())
          log.write(step, {k.replace("eval/", "eval_ema/", 1): v for k, v in averaged.items()})
          log.say(f"step {step:>7}/{cfg.steps} | EMA weights: {describe_eval(averaged)}")
      if tasks_due:
        events.begin("eval", step, tasks=len(cfg.eval.tasks))
        results = tasks.run(run, state.params, step, lambda batches: evaluate(run, state.params, batches))
        log.write(step, results)
        log.say(f"step {step:>7}/{cfg.steps} | {evals.describe(results)}")
      if saving:
        events.begin("checkpoint_save", step)
        save(step)
        last_saved = step
        log.say(f"step {step:>7}/{cfg.steps} | checkpoint {checkpoints.directory / str(step)} (written in the "
                "background)")
      elif local is not None and step % cfg.local_checkpoint_every == 0:
        events.begin("checkpoint_save", step, tier="local")
        local.save(step, state_tree(state), config=config_json, data_position=train_batches.get_state())
      if logging_now:   # the next throughput window starts after this step's evaluation and save
        throughput.restart()
      if stopping:
        events.begin("preemption", step)
        checkpoints.wait()
        log.say(f"stopped by SIGTERM at step {step}; checkpoint saved in {checkpoints.directory}; "
                "run the same command again to continue")
        return final
    events.begin("checkpoint_save", step)   # the final evaluation (if not done yet) and waiting for the save
    if not final:   # resumed a run that had already finished
      final = evaluate(run, state.params, eval_batches, weights())
    checkpoints.wait()
    log.say(f"done: {cfg.steps} steps | {describe_eval(final)}\ncheckpoint:  {checkpoints.directory / str(cfg.steps)}\n"
            f"tensorboard: tensorboard --logdir {log.tensorboard_dir}")
    return final
  finally:
    checkpoints.wait()
    checkpoints.close()
    if local is not None:
      local.wait()
    stop.restore()
    events.close(wait=state)
    log.close()
