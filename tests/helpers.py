"""Shared test helpers: the shipped corpus as bytes, a small model config, jitted init / forward / loss and a tiny
training step (compiled once per config and shared between tests), relative errors, and running the CLIs."""
import atexit
import dataclasses
import functools
import gzip
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax

from tokenformer_jax.config import ModelConfig, ParamTokens
from tokenformer_jax.model import LanguageModel, init_params

CORPUS = pathlib.Path(__file__).resolve().parent.parent / "tokenformer_jax/data/corpus/python-docs-slice.jsonl.gz"


@functools.cache
def corpus_bytes() -> np.ndarray:
  """The shipped corpus as byte tokens (vocabulary 256): real English text without a tokenizer."""
  with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
    text = "".join(json.loads(line)["text"] for line in f)
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def text_batch(batch: int, length: int, offset: int = 0) -> np.ndarray:
  data = corpus_bytes()
  return np.stack([data[offset + i * length: offset + (i + 1) * length] for i in range(batch)])


def next_token_loss(cfg, params, tokens):
  logits = LanguageModel(cfg).apply({"params": params}, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


# The small TokenFormer of the in-process tests that compile whole models (d = 32, 2 layers, byte vocabulary, storage
# padded to multiples of 8); each file replaces what its check is about (token counts, kernel, block, remat).
SMALL = ModelConfig(name="small", vocab_size=256, d_model=32, n_layers=2, n_heads=4,
                    param_tokens=ParamTokens.uniform(24, 100), token_multiple=8, max_seq_len=128)

# Eager init and eager forward passes compile every primitive for every shape (minutes over the suite); these
# compile each config once, and tests with the same config and shapes share the compilation.
jit_next_token_loss = jax.jit(next_token_loss, static_argnums=0)

# Settings that change what a model computes but neither its parameters nor their initial draws.
_COMPUTE_ONLY = dict(positions="none", remat="none", dtype="float32", normalization="l2_norm_gelu",
                     norm_scale="fixed", norm_scale_tokens=None, pattention_kernel="plain", pattention_impl="auto",
                     pattention_block=2048)


def initial_params(cfg, seed: int = 0) -> dict:
  """init_params(cfg, jax.random.key(seed)), jitted, and computed once per parameter layout and seed: configs that
  differ only in the settings above get the same (identical) parameters."""
  return jax.tree.map(lambda x: x, _initial_params(cfg.replace(name="params", **_COMPUTE_ONLY), seed))


@functools.cache
def _initial_params(cfg, seed):
  return jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed))


@functools.cache
def forward(cfg):
  """jit(LanguageModel(cfg).apply), one per config."""
  return jax.jit(LanguageModel(cfg).apply)


def relative_error(got, want) -> float:
  """max |got − want| / max |want| (in float64; 0 when both are zero)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def assert_relative_close(got, want, tolerance=1e-5):
  """Every leaf of the tree `got` within `tolerance` of the same leaf of `want`, relative to its largest entry."""
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    error = relative_error(g, w)
    assert error <= tolerance, f"{jax.tree_util.keystr(path)}: relative error {error:.2e}"


def make_train_step(cfg, tx):
  @jax.jit
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(functools.partial(next_token_loss, cfg))(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


REPO = pathlib.Path(__file__).resolve().parent.parent
TEST_RUN = "--config=experiments/demo.py:test_run"
# conftest's trained_run evaluates these during training (train/evals.py), every 6 steps, and writes an offline
# W&B run (train/logger.py).
TRAINED_RUN_SETS = ("--set=eval.tasks=lm_eval:tokenformer_local_mc,ppl:tests/lm_eval_task/heldout.txt",
                    "--set=eval.include_path=tests/lm_eval_task")
HELDOUT = "tests/lm_eval_task/heldout.txt"


def local_mc_accuracy(lm) -> float:
  """The accuracy on tests/lm_eval_task's multiple-choice task computed here from an adapter's log-likelihoods
  (`lm`: a TokenFormerLM), without lm_eval's evaluator."""
  from lm_eval.api.instance import Instance
  docs = [json.loads(line) for line in (REPO / "tests/lm_eval_task/local_mc.jsonl").read_text().splitlines()]
  scores = [[lp for lp, _ in lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=(d["context"], c), idx=0)
                                               for c in d["choices"]])] for d in docs]
  return float(np.mean([int(np.argmax(s)) == d["label"] for s, d in zip(scores, docs)]))


WANDB_OFFLINE = ("--set=logging.wandb=tokenformer-tests", "--set=logging.wandb_mode=offline")


def trained_run_config():
  """The config conftest's trained_run trains: test_run with TRAINED_RUN_SETS and WANDB_OFFLINE."""
  from tokenformer_jax.config import apply_overrides, load_config
  sets = [flag.removeprefix("--set=") for flag in (*TRAINED_RUN_SETS, *WANDB_OFFLINE)]
  return apply_overrides(load_config("experiments/demo.py:test_run"), sets)


def wandb_runs(workdir) -> list[dict]:
  """The offline W&B runs under WORKDIR/wandb, oldest first, read from their .wandb files without wandb's own
  reader (wandb 0.31 has none in Python): {"id", "project", "config", "history": {step: {key: value}}}.
  A .wandb file is a LevelDB-style log (a 7-byte header, then records in 32 KiB blocks, each a 7-byte header —
  CRC, little-endian length, type 1 full / 2 first / 3 middle / 4 last — and its bytes) of wandb's Record protos."""
  from wandb.proto import wandb_internal_pb2
  runs = []
  for path in sorted(pathlib.Path(workdir).glob("wandb/offline-run-*/run-*.wandb")):
    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
      if block - pos % block < 7:   # a block's tail too short for a header is padding
        pos += block - pos % block
        continue
      length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
      pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
      if kind in (1, 4):
        records.append(wandb_internal_pb2.Record.FromString(pending))
        pending = b""
    run = next((r.run for r in records if r.WhichOneof("record_type") == "run"), None)
    if run is None:   # a SIGKILLed process whose records were still buffered: its id only (from the name)
      runs.append({"id": path.parent.name.rsplit("-", 1)[1], "project": None, "config": {}, "history": {}})
      continue
    history = {}
    for r in records:
      if r.WhichOneof("record_type") == "history":
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    runs.append({"id": run.run_id, "project": run.project, "config": config, "history": history})
  return runs


def run_cli(module: str, *args: str, devices: int = 1, script: tuple[str, ...] | None = None, timeout: int = 600,
            env: dict | None = None, fresh: bool = False):
  """Run `python -m module args` (or `python script... args`) from the repository root, as a user would, on
  `devices` CPU devices; `env` adds to (a value of None: removes from) the environment. The command runs in a
  child of this worker's fork server (tests/fork_server.py: its imports are paid once), or in a process of its
  own with `fresh=True` (what a console check needs: the imports' own output) or when `env` changes a JAX_*
  variable, which jax reads as it is imported."""
  full = _cli_env(devices, env)
  command = [sys.executable, *(script or ("-m", module)), *args]
  server = None if fresh else _fork_server()
  if server is None or _jax_env(full) != _jax_env(server.env) or server.process.poll() is not None:
    return subprocess.run(command, cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)
  target = script[0] if script else module
  server.process.stdin.write(json.dumps({"target": target, "args": [*script[1:], *args] if script else list(args),
                                         "env": full, "timeout": timeout}) + "\n")
  server.process.stdin.flush()
  line = server.process.stdout.readline()
  if not line:
    raise RuntimeError(f"tests/fork_server.py died (exit {server.process.wait()}) while running {command}")
  reply = json.loads(line)
  if reply["timed_out"]:
    raise subprocess.TimeoutExpired(command, timeout, reply["stdout"], reply["stderr"])
  return subprocess.CompletedProcess(command, reply["rc"], reply["stdout"], reply["stderr"])


def _cli_env(devices: int = 1, env: dict | None = None) -> dict:
  """This process's environment for a command on `devices` CPU devices, with `env` added (None: removed)."""
  full = {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""}
  for name, value in (env or {}).items():
    if value is None:
      full.pop(name, None)
    else:
      full[name] = value
  return full


def _jax_env(env: dict) -> dict:
  return {name: value for name, value in env.items() if name.startswith("JAX_")}


@dataclasses.dataclass
class _Server:
  process: subprocess.Popen
  env: dict


@functools.cache
def _fork_server() -> _Server:
  """This worker's tests/fork_server.py, started on first use (it is this process's child: it ends with it)."""
  env = _cli_env()   # what a one-device command gets (its JAX_* variables are the ones jax was imported with)
  process = subprocess.Popen([sys.executable, "tests/fork_server.py"], cwd=REPO, env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
  atexit.register(process.kill)
  return _Server(process, env)


def run_main(module, capsys, *args: str) -> tuple[int, str, str]:
  """A tool's absl main in this process, `args` on its command line (a subprocess costs seconds of imports):
  (exit code, stdout, stderr)."""
  from absl import flags
  flags.FLAGS.unparse_flags()
  argv = flags.FLAGS([module.__name__, *args])
  code = 0
  try:
    module.main(argv)
  except SystemExit as exited:
    code = exited.code
  finally:
    flags.FLAGS.unparse_flags()
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def run_params(directory, model, step: int | None = None) -> dict:
  """The parameters of checkpoint `step` (default: the newest) of the run in `directory`, for `model`."""
  from tokenformer_jax.checkpoint import RunCheckpoints
  from tokenformer_jax.model import abstract_params
  return RunCheckpoints(directory, read_only=True).restore_params(abstract_params(model), step)


def losses(workdir, key: str = "train/loss") -> dict[int, float]:
  """step → value from metrics.jsonl, the last occurrence winning (steps re-run after a kill repeat)."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if key in record:
      out[record["step"]] = record[key]
  return out


def assert_fails_with_one_line(result, *phrases):
  """Exit code 1 and exactly one 'error: ...' line on stderr, containing every phrase."""
  assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1, result.stderr[-2000:]
  for phrase in phrases:
    assert phrase in error_lines[0], error_lines[0]


def launch_local(processes: int, devices: int, *command: str, env: dict | None = None, timeout: int = 600):
  """`python -m launch.local`: `command` (after "python") as one JAX job of `processes` processes with `devices`
  fake CPU devices each, from the repository root; `env` adds to the environment."""
  full = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  full.pop("XLA_FLAGS", None)
  argv = [sys.executable, "-m", "launch.local", f"--processes={processes}", f"--devices_per_process={devices}",
          "--heartbeat_seconds=15", "--grace_seconds=120", "--", "python", *command]
  return subprocess.run(argv, cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)


def exit_codes(result) -> dict[int, int]:
  """process index → exit code, as launch.local reported them."""
  codes = {}
  for line in result.stdout.splitlines():
    if line.startswith("launch.local: process ") and " exited with code " in line:
      codes[int(line.split()[2])] = int(line.rsplit(" ", 1)[1])
  return codes


# The run of the multi-process tests (test_multiprocess.py): test_run for 8 steps, every loss
# logged, one evaluation at the end, checkpoints only where SIGTERM asks for them.
JOB_STEPS = 8
JOB_RUN = (TEST_RUN, f"--set=steps={JOB_STEPS}", "--set=checkpoint_every=100", f"--set=eval_every={JOB_STEPS}",
           "--set=eval_batches=1", "--set=log_every=1")


FSDP = ("--set=mesh.preset=fsdp", "--set=mesh.data=1", "--set=mesh.fsdp=-1")
# One run through jobs of other shapes (test_multiprocess.py's elastic_run): (processes, devices per process, flags,
# the fault sent before the job's N-th step, the process it goes to: None = every one). The global batch is 8 throughout.
ELASTIC_JOBS = (
    (4, 1, (), ("SIGTERM", 2), 2),      # steps 1-2; SIGTERM to one of 4 processes stops them all
    (2, 2, FSDP, ("SIGTERM", 2), 1),    # steps 3-4 under the fsdp preset; SIGTERM to one of 2
    (1, 4, (), ("SIGTERM", 2), None),   # steps 5-6 under dp on one process: a checkpoint of 2 processes resumed by 1
    (2, 1, (), ("SIGKILL", 1), 1),      # process 1 killed at its first step: the job fails, nothing is saved
    (2, 1, (), ("none", 0), None),      # steps 7-8 with 2 rows per device as before: grad_accum 1 → 2
)


def train_job(workdir, processes: int, devices: int, *flags: str, fault: tuple[str, int] = ("none", 0),
              fault_process: int | None = None):
  """JOB_RUN in `workdir` as one launch.local job through tests/train_with_fault.py: `fault` = (signal, N) sent
  before each process's N-th step (only to `fault_process` if given); every process appends the window ids it
  trains on to WORKDIR-rows/rows.jsonl."""
  rows = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}-rows"
  rows.mkdir(parents=True, exist_ok=True)
  env = {"ROWS_DIR": str(rows), **({"FAULT_PROCESS": str(fault_process)} if fault_process is not None else {})}
  return launch_local(processes, devices, "tests/train_with_fault.py", fault[0], str(fault[1]), *JOB_RUN, *flags,
                      f"--workdir={workdir}", env=env)
