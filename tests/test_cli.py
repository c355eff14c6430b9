"""Every tool's console as a user sees it (each run once, as a subprocess, on tiny inputs): no library log lines
(absl, Orbax, JAX, Python warnings) and, with JAX_PLATFORMS unset on this machine without a TPU, none of libtpu's
probe errors; and the one spelling of "a run or one of its checkpoints", --checkpoint=RUN[/STEP], with the old
--src/--step still accepted and warned about."""
import gzip
import json
import re

import pytest

from helpers import CORPUS, run_cli
from test_neox import EOT, neox_state_dict, tiny_config, write_checkpoint
from tokenformer_jax.growth import read_provenance

# absl's and glog's "I1203 08:00:00.123456 ..." (also C++ runtimes' "E0000 00:00:17...."), Python logging's
# default "WARNING:absl:...", a Python warning "file.py:12: UserWarning: ...", and the runtimes' own preambles.
LIBRARY_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ |^(WARNING|INFO|ERROR):[\w.]+:|^\S+:\d+: \w*Warning: |"
                          r"^WARNING: Logging before|^=== Source Location Trace")
PROBE = ("Failed to find host bounds", "unexpected worker hostname", "TPU initialization failed", "libtpu")
GROWN_TARGET = "--config=experiments/demo.py:test_run_grown"


def run(*args):
  """`python -m args` from the repository root as a user runs it here: a process of its own (its console shows
  what its imports print), JAX_PLATFORMS not set, one CPU device."""
  return run_cli(*args, env={"JAX_PLATFORMS": None, "HF_DATASETS_OFFLINE": "1"}, fresh=True)


def console_lines(result) -> list[str]:
  return [line for line in re.split(r"[\r\n]", result.stdout + result.stderr) if line.strip()]


def hub_directory(directory) -> str:
  """A 2-layer TokenFormer in the authors' hub layout, with a small byte-level BPE tokenizer.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f][:50]
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=300, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tokenizer.save(str(directory / "bpe.json"))
  config = tiny_config()
  return write_checkpoint(directory / "TokenFormer-tiny", config, neox_state_dict(config, 384),
                          str(directory / "bpe.json"))


@pytest.fixture(scope="module")
def consoles(trained_run, tmp_path_factory):
  """name → finished process of each tool that reads or writes a run, run once with the new spellings, and of
  grow and export_neox with the old ones."""
  tmp = tmp_path_factory.mktemp("consoles")
  hub, imported = hub_directory(tmp), tmp / "imported"
  return {
      "eval": run("tokenformer_jax.cli.eval", f"--checkpoint={trained_run}/12", "--max_tokens=64"),
      "generate": run("tokenformer_jax.cli.generate", f"--checkpoint={trained_run}", "--prompt=The",
                      "--max_new_tokens=1"),
      "lm_eval": run("tokenformer_jax.cli.lm_eval", "--model", "tokenformer_jax", "--model_args",
                     f"checkpoint={trained_run}", "--include_path", "tests/lm_eval_task", "--tasks",
                     "tokenformer_local_mc", "--limit", "1"),
      "report": run("tokenformer_jax.cli.report", str(trained_run), f"--out={tmp / 'report'}"),
      "import_neox": run("tokenformer_jax.cli.import_neox", f"--src={hub}", f"--dst={imported}"),
      "export_neox": run("tokenformer_jax.cli.export_neox", f"--checkpoint={imported}/0", f"--dst={tmp / 'new'}"),
      "grow": run("tokenformer_jax.cli.grow", f"--checkpoint={trained_run}/8", GROWN_TARGET,
                  f"--dst={tmp / 'grown_new'}"),
      "old export_neox": run("tokenformer_jax.cli.export_neox", f"--src={imported}", "--step=0",
                             f"--dst={tmp / 'old'}"),
      "old grow": run("tokenformer_jax.cli.grow", f"--src={trained_run}", "--step=8", GROWN_TARGET,
                      f"--dst={tmp / 'grown_old'}"),
  }, tmp


@pytest.mark.slow
def test_no_tool_prints_library_log_lines(consoles):
  results, _ = consoles
  for name, result in results.items():
    assert result.returncode == 0, (name, result.stderr[-3000:])
    library = [line for line in console_lines(result) if LIBRARY_LINE.search(line)]
    assert library == [], (name, library[:5])
    said = [line for line in console_lines(result) if line.startswith("library log lines go to ")]
    assert len(said) <= 1, (name, said)
    for line in said:   # said when the first one came: the log file it names has them
      log = line.removeprefix("library log lines go to ").split(" (")[0]
      assert any(LIBRARY_LINE.search(kept) for kept in open(log, encoding="utf-8").read().splitlines()), log
  assert "loss" in results["eval"].stdout and "tokenformer_local_mc" in results["lm_eval"].stdout


@pytest.mark.slow
def test_no_libtpu_probe_without_a_tpu_and_the_plan_still_describes_one(consoles):
  results, _ = consoles
  for name, result in results.items():
    probes = [line for line in console_lines(result) if any(p in line for p in PROBE)]
    assert probes == [], (name, probes[:3])
  # cli.plan asks libtpu for a v4-8's 4 chips (then refuses a mesh that cannot split them: no compile needed).
  plan = run("tokenformer_jax.cli.plan", "--config=experiments/tiny.py:tiny_tokenformer", "--topology=v4-8",
             "--set=mesh.tensor=3")
  assert plan.returncode == 1 and plan.stderr.splitlines()[-1] == (
      "error: mesh (data=1, fsdp=-1, tensor=3) cannot fill 4 devices: 4 is not divisible by 3; set mesh sizes "
      "whose product divides 4"), plan.stderr[-2000:]
  assert not [line for line in console_lines(plan) if any(p in line for p in PROBE) or LIBRARY_LINE.search(line)]


@pytest.mark.slow
def test_checkpoint_is_the_one_spelling_and_the_old_one_warns(consoles, trained_run):
  results, tmp = consoles
  for tool in ("grow", "export_neox"):
    new, old = results[tool], results[f"old {tool}"]
    assert not [line for line in console_lines(new) if "old spelling" in line]
    warnings = [line for line in old.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "is the old spelling of --checkpoint=" in warnings[0], old.stderr[-2000:]
  said = f"warning: --src={trained_run} --step=8 is the old spelling of --checkpoint={trained_run}/8"
  assert said in results["old grow"].stderr.splitlines()
  # Both spellings read the same checkpoint and write the same result.
  assert read_provenance(tmp / "grown_new") == read_provenance(tmp / "grown_old")
  assert read_provenance(tmp / "grown_new").source_step == 8
  for name in ("pytorch_model.bin", "config.json"):
    assert (tmp / "new" / name).read_bytes() == (tmp / "old" / name).read_bytes(), name
