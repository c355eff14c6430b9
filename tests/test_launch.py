"""The launcher: exact gcloud command lines, retries, preemption recovery, flag checks, and the ladder end to end.

A fake `gcloud` (tests/fake_gcloud.py) on PATH records every call and plays back scripted answers; no real
gcloud is ever needed. The local ladder runs the tiny ladder on CPU in subprocesses.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch import gcloud
from launch.ladder import check_ladder, load_stages
from launch.runner import LaunchError, Runner, display
from launch.tpu import Job, TpuVm, checkpoint_url, committed

REPO = pathlib.Path(__file__).resolve().parent.parent
SPEC = gcloud.TpuSpec(name="tf-test", zone="us-central2-b", project="proj", accelerator="v4-32")
WHERE = ["--zone=us-central2-b", "--project=proj"]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]


class FakeGcloud:
  """Puts tests/fake_gcloud.py on PATH as `gcloud`; `script(rules)` sets its answers, `calls()` reads its log."""

  def __init__(self, tmp_path: pathlib.Path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable = bin_dir / "gcloud"
    executable.write_text(f"#!{sys.executable}\n" + (REPO / "tests" / "fake_gcloud.py").read_text())
    executable.chmod(0o755)
    self.log, self.rules = tmp_path / "gcloud.log", tmp_path / "gcloud.json"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(self.log))
    monkeypatch.setenv("FAKE_GCLOUD_SCRIPT", str(self.rules))
    self.script([])

  def script(self, rules: list[dict]) -> None:
    self.rules.write_text(json.dumps(rules))

  def calls(self) -> list[list[str]]:
    return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture
def fake(tmp_path, monkeypatch):
  return FakeGcloud(tmp_path, monkeypatch)


def say(match, *answers):
  return {"match": match, "answers": list(answers)}


OK = {"rc": 0}
NOT_FOUND = {"rc": 1, "stderr": "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found\n"}
NO_OBJECTS = {"rc": 1, "stderr": "ERROR: (gcloud.storage.ls) One or more URLs matched no objects.\n"}
UNAVAILABLE = {"rc": 1, "stderr": "ERROR: (gcloud.compute.tpus.tpu-vm.create) UNAVAILABLE: The service is "
                                  "currently unavailable. Please try again.\n"}


def state(name):
  return {"stdout": f"{name}\n"}


# Command lines --------------------------------------------------------------------------------------------------
def test_tpu_vm_commands_follow_the_documented_syntax():
  assert gcloud.create(SPEC) == TPU_VM + ["create", "tf-test", *WHERE, "--accelerator-type=v4-32",
                                          "--version=tpu-ubuntu2204-base"]
  spot = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-64", provisioning="spot")
  assert gcloud.create(spot) == TPU_VM + ["create", "tf-test", *WHERE, "--accelerator-type=v4-64",
                                          "--version=tpu-ubuntu2204-base", "--spot"]
  reserved = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-8", provisioning="reserved")
  assert gcloud.create(reserved)[-1] == "--reserved"
  assert gcloud.describe_state(SPEC) == TPU_VM + ["describe", "tf-test", *WHERE, "--format=value(state)"]
  assert gcloud.delete(SPEC) == TPU_VM + ["delete", "tf-test", *WHERE, "--quiet"]
  assert gcloud.scp_to_all(SPEC, "/tmp/code.tar.gz") == TPU_VM + ["scp", "/tmp/code.tar.gz", "tf-test:",
                                                                   "--worker=all", *WHERE, "--quiet"]
  assert gcloud.ssh(SPEC, "hostname") == TPU_VM + ["ssh", "tf-test", *WHERE, "--worker=all", "--command=hostname",
                                                   "--quiet"]
  assert gcloud.ssh(SPEC, "hostname", worker="0")[-3] == "--worker=0"
  assert gcloud.storage_ls("gs://b/run/x") == ["gcloud", "storage", "ls", "gs://b/run/x"]
  assert SPEC.hosts == 4 and SPEC.chips == 16


def test_queued_resource_commands_follow_the_documented_syntax():
  spot = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-32", provisioning="spot", queued=True)
  assert gcloud.create(spot) == QUEUED + ["create", "tf-test", "--node-id=tf-test", *WHERE, "--accelerator-type=v4-32",
                                          "--runtime-version=tpu-ubuntu2204-base", "--spot"]
  best_effort = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-32", provisioning="best-effort", queued=True)
  assert gcloud.create(best_effort) == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "tf-test",
                                        "--node-id=tf-test", *WHERE, "--accelerator-type=v4-32",
                                        "--runtime-version=tpu-ubuntu2204-base", "--best-effort"]
  assert gcloud.describe_queued_state(spot) == QUEUED + ["describe", "tf-test", *WHERE, "--format=value(state.state)"]
  assert gcloud.delete(spot) == QUEUED + ["delete", "tf-test", *WHERE, "--force", "--quiet"]


def test_worker_scripts_are_the_same_on_every_worker():
  start = gcloud.start_script("s.train", ["python", "-m", "tokenformer_jax.cli.train", "--config=experiments/x.py:a",
                                          "--set=data.train_files=a b"])
  assert start == ("mkdir -p $HOME/tokenformer-logs && cd $HOME/tokenformer && nohup $HOME/tokenformer-venv/bin/python "
                   "-m tokenformer_jax.cli.train --config=experiments/x.py:a '--set=data.train_files=a b' > "
                   "$HOME/tokenformer-logs/s.train.$(hostname).log 2>&1 < /dev/null & "
                   "echo $! > $HOME/tokenformer-logs/s.train.pid")
  setup = gcloud.setup_script()
  assert setup.startswith("set -e; ") and "tar -xzf $HOME/tokenformer_jax-src.tar.gz" in setup
  assert setup.endswith('cd $HOME/tokenformer && $HOME/tokenformer-venv/bin/pip install -q ".[tpu]"')
  assert "python3.11 -m venv $HOME/tokenformer-venv" in setup
  assert gcloud.alive_script("j") == ('if kill -0 "$(cat $HOME/tokenformer-logs/j.pid 2>/dev/null)" 2>/dev/null; then '
                                      'echo "j ALIVE on $(hostname)"; else echo "j DEAD on $(hostname)"; fi')
  assert gcloud.collect_script("j", "gs://b/logs/") == "gcloud storage cp $HOME/tokenformer-logs/j.*.log gs://b/logs/"
  assert display(gcloud.ssh(SPEC, "echo 'hi'")) == ("gcloud compute tpus tpu-vm ssh tf-test --zone=us-central2-b "
                                                    "--project=proj --worker=all --command='echo '\"'\"'hi'\"'\"'' "
                                                    "--quiet")


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(accelerator="v4-12"), "unknown accelerator type 'v4-12'"),
    (dict(accelerator="v5e-8"), "unknown accelerator type 'v5e-8'"),
    (dict(project=""), "needs --project and --zone"),
    (dict(zone=""), "needs --project and --zone"),
    (dict(name="Bad_Name"), "lowercase letters"),
    (dict(provisioning="best-effort"), "only for queued resources"),
    (dict(provisioning="cheap"), "--provisioning must be one of"),
])
def test_bad_tpu_specs_are_refused(kwargs, phrase):
  with pytest.raises(ValueError, match=phrase.replace("(", r"\(")):
    gcloud.TpuSpec(**{**dict(name="tf", zone="z", project="p", accelerator="v4-8"), **kwargs})


def test_the_code_archive_holds_what_pip_install_needs(tmp_path):
  import tarfile
  from launch.tpu import build_archive
  names = tarfile.open(build_archive(tmp_path / "code.tar.gz")).getnames()
  for needed in ("setup.py", "README.md", "tokenformer_jax/config.py", "tokenformer_jax/cli/train.py",
                 "tokenformer_jax/data/corpus/python-docs-bpe2048.model", "experiments/ladder.py", "launch/tpu.py"):
    assert needed in names
  assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


# The runner -----------------------------------------------------------------------------------------------------
def test_transient_failures_are_retried_with_exponential_backoff(fake):
  fake.script([say(["create"], UNAVAILABLE, {"rc": 1, "stderr": "ERROR: Rate Limit Exceeded\n"}, OK)])
  sleeps, lines = [], []
  result = Runner(sleep=sleeps.append, say=lines.append).run(gcloud.create(SPEC))
  assert result.returncode == 0
  assert fake.calls() == [gcloud.create(SPEC)] * 3
  assert sleeps == [10.0, 20.0]
  assert sum("transient failure" in line for line in lines) == 2


def test_permanent_failure_stops_at_once_with_one_line(fake):
  fake.script([say(["create"], {"rc": 1, "stderr": "Creating TPU...\nERROR: (gcloud.compute.tpus.tpu-vm.create) "
                                                 "PERMISSION_DENIED: Permission 'tpu.nodes.create' denied\n"})])
  sleeps = []
  with pytest.raises(LaunchError) as error:
    Runner(sleep=sleeps.append, say=lambda line: None).run(gcloud.create(SPEC))
  assert str(error.value) == ("`gcloud compute tpus tpu-vm create tf-test` failed (exit 1): ERROR: (gcloud.compute."
                              "tpus.tpu-vm.create) PERMISSION_DENIED: Permission 'tpu.nodes.create' denied")
  assert len(fake.calls()) == 1 and sleeps == []


def test_transient_failures_give_up_after_the_last_attempt_and_quota_is_permanent(fake):
  fake.script([say(["create"], UNAVAILABLE)])
  sleeps = []
  with pytest.raises(LaunchError, match="still failing after 4 attempts"):
    Runner(attempts=4, sleep=sleeps.append, say=lambda line: None).run(gcloud.create(SPEC))
  assert sleeps == [10.0, 20.0, 40.0] and len(fake.calls()) == 4
  fake.log.unlink()
  fake.script([say(["create"], {"rc": 1, "stderr": "ERROR: RESOURCE_EXHAUSTED: Quota 'TPUV4' exceeded\n"})])
  with pytest.raises(LaunchError, match="Quota"):
    Runner(sleep=sleeps.append, say=lambda line: None).run(gcloud.create(SPEC))
  assert len(fake.calls()) == 1


def test_expected_answers_are_returned_not_raised(fake):
  url = "gs://b/run/checkpoints/10/commit_success.txt"
  fake.script([say(["storage", "ls"], NO_OBJECTS, {"stdout": url + "\n"})])
  runner = Runner(say=lambda line: None)
  assert not committed(runner, url) and committed(runner, url)
  assert fake.calls() == [["gcloud", "storage", "ls", url]] * 2


# Watching a job on a TPU ----------------------------------------------------------------------------------------
def make_vm(spec=SPEC, **kwargs):
  sleeps, lines = [], []
  runner = Runner(sleep=sleeps.append, say=lines.append)
  vm = TpuVm(spec, runner, archive=lambda: pathlib.Path("/tmp/code.tar.gz"), poll_s=30, **kwargs)
  return vm, sleeps, lines


TRAIN = ["python", "-m", "tokenformer_jax.cli.train", "--config=experiments/ladder.py:s", "--workdir=gs://b/s"]
DONE_URL = checkpoint_url("gs://b/s", 100)


def train_job(vm):
  return Job("s.train", TRAIN, done=lambda: committed(vm.runner, DONE_URL), logs_to="gs://b/logs")


def ssh(script):
  return gcloud.ssh(SPEC, script)


def test_watch_recreates_a_preempted_tpu_and_restarts_the_same_command(fake):
  fake.script([
      say(["tpu-vm", "describe"], NOT_FOUND, state("CREATING"), state("READY"),   # first creation
          state("READY"),                                                          # poll 1: fine
          state("PREEMPTED"),                                                      # poll 2
          NOT_FOUND, state("READY"),                                               # after the delete
          state("READY")),                                                         # poll 3
      say(["tpu-vm", "create"], UNAVAILABLE, OK, OK),
      say(["ssh", "ALIVE"], {"stdout": "s.train DEAD on w-0\n"},
          {"stdout": "s.train ALIVE on w-0\ns.train ALIVE on w-1\n"},
          {"stdout": "s.train DEAD on w-0\ns.train DEAD on w-1\n"}),
      say(["storage", "ls"], NO_OBJECTS, {"stdout": DONE_URL + "\n"}),
  ])
  vm, sleeps, lines = make_vm()
  vm.run_job(train_job(vm))
  describe, create, delete = gcloud.describe_state(SPEC), gcloud.create(SPEC), gcloud.delete(SPEC)
  scp = TPU_VM + ["scp", "/tmp/code.tar.gz", "tf-test:", "--worker=all", *WHERE, "--quiet"]
  setup, start = ssh(gcloud.setup_script()), ssh(gcloud.start_script("s.train", TRAIN))
  alive, ls = ssh(gcloud.alive_script("s.train")), ["gcloud", "storage", "ls", DONE_URL]
  assert fake.calls() == [
      describe, create, create, describe, describe,             # absent → create (a transient retry) → READY
      alive, scp, setup, start,                                 # not running yet: copy, set up, start
      describe, alive,                                          # poll 1: READY, running
      describe, ls, delete, describe, create, describe,         # poll 2: PREEMPTED, not done → delete, create
      scp, setup, start,                                        # the same command again
      describe, alive, ls,                                      # poll 3: it exited, and its checkpoint is there
      ssh(gcloud.collect_script("s.train", "gs://b/logs")),
  ]
  assert start[-2] == ("--command=mkdir -p $HOME/tokenformer-logs && cd $HOME/tokenformer && nohup "
                       "$HOME/tokenformer-venv/bin/python -m tokenformer_jax.cli.train "
                       "--config=experiments/ladder.py:s --workdir=gs://b/s > "
                       "$HOME/tokenformer-logs/s.train.$(hostname).log 2>&1 < /dev/null & "
                       "echo $! > $HOME/tokenformer-logs/s.train.pid")
  assert sleeps == [10.0, 30, 30, 30, 30]   # one backoff, one wait for CREATING, three polls
  assert any("state PREEMPTED: recreating" in line for line in lines)


def test_a_job_that_died_with_an_error_stops_the_watch(fake):
  fake.script([
      say(["tpu-vm", "describe"], state("READY")),
      say(["ssh", "ALIVE"], {"stdout": "s.train ALIVE on w-0\n"}, {"stdout": "s.train DEAD on w-0\n"}),
      say(["ssh", "tail -n"], {"stdout": "==> s.train.w-0.log <==\nerror: the tokenizer gs://b/t.model has 2048 "
                                         "pieces but model.vocab_size is 50277\n"}),
      say(["storage", "ls"], NO_OBJECTS),
  ])
  vm, _, _ = make_vm()
  with pytest.raises(LaunchError) as error:
    vm.run_job(train_job(vm))
  assert str(error.value) == ("s.train failed on tf-test: the tokenizer gs://b/t.model has 2048 pieces but "
                              "model.vocab_size is 50277")
  calls = fake.calls()
  assert ssh(gcloud.start_script("s.train", TRAIN)) not in calls   # it was running: adopted, not restarted
  assert gcloud.delete(SPEC) not in calls and gcloud.create(SPEC) not in calls


def test_a_job_that_keeps_dying_is_recreated_then_given_up(fake):
  fake.script([
      say(["tpu-vm", "describe"], state("READY")),
      say(["ssh", "ALIVE"], {"stdout": "s.train DEAD on w-0\n"}),
      say(["storage", "ls"], NO_OBJECTS),
  ])
  vm, _, lines = make_vm(max_restarts=1)
  with pytest.raises(LaunchError, match="s.train died 2 times on tf-test without finishing; its logs: gs://b/logs"):
    vm.run_job(train_job(vm))
  calls = fake.calls()
  assert calls.count(gcloud.delete(SPEC)) == 1                         # recreated once, then gave up
  assert calls.count(ssh(gcloud.start_script("s.train", TRAIN))) == 2
  assert any("recreating the TPU (1/1)" in line for line in lines)


def test_a_queued_resource_is_waited_for_then_used(fake):
  spec = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-32", provisioning="spot", queued=True)
  fake.script([
      say(["queued-resources", "describe"], NOT_FOUND, state("WAITING_FOR_RESOURCES"), state("PROVISIONING"),
          state("ACTIVE")),
      say(["tpu-vm", "describe"], state("READY")),
  ])
  vm, sleeps, _ = make_vm(spec)
  vm.ensure_ready()
  queued_describe = gcloud.describe_queued_state(spec)
  assert fake.calls() == [queued_describe, gcloud.create(spec), queued_describe, queued_describe, queued_describe,
                          gcloud.describe_state(spec)]
  assert sleeps == [30, 30]


def test_tpu_cli_permanent_failure_is_one_clear_line(fake):
  fake.script([
      say(["describe"], NOT_FOUND),
      say(["create"], {"rc": 1, "stderr": "ERROR: (gcloud.compute.tpus.tpu-vm.create) INVALID_ARGUMENT: Cloud TPU "
                                          "received a bad request. v4-32 is not available in europe-west4-a\n"}),
  ])
  result = run_cli("launch.tpu", "up", "--name=tf-test", "--project=proj", "--zone=europe-west4-a",
                   "--accelerator=v4-32")
  assert_one_error_line(result, "`gcloud compute tpus tpu-vm create tf-test` failed (exit 1): ERROR: "
                                "(gcloud.compute.tpus.tpu-vm.create) INVALID_ARGUMENT")
  assert [c[4] for c in fake.calls()] == ["describe", "create"]


# CLIs and flags -------------------------------------------------------------------------------------------------
def run_cli(module, *args, timeout=120):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def assert_one_error_line(result, phrase):
  assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-2000:]
  assert phrase in errors[0], errors[0]


PAPER_TPU = ["--ladder=paper", "--backend=tpu", "--workdir=gs://bkt/ladder", "--project=proj", "--zone=us-central2-b",
             "--set=data.tfds_data_dir=gs://bkt/tfds", "--set=data.tokenizer=gs://bkt/neox.model"]

BAD_LADDER = """
import dataclasses
from tokenformer_jax.config import load_config
_tiny = load_config("experiments/ladder.py:LADDERS")["tiny"]
tiny_0 = _tiny[0].config
tiny_1 = _tiny[1].config.replace(model=_tiny[1].config.model.replace(d_model=128))
{name} = (_tiny[0], dataclasses.replace(_tiny[1], config=tiny_1{accelerator}))
"""


@pytest.mark.parametrize("module, args, phrase", [
    ("launch.tpu", ["up", "--name=tf", "--project=p", "--zone=z", "--accelerator=v4-12"],
     "unknown accelerator type 'v4-12'"),
    ("launch.tpu", ["up", "--name=tf", "--zone=z", "--accelerator=v4-8"], "needs --project and --zone"),
    ("launch.tpu", ["train", "--name=tf", "--project=p", "--zone=z", "--config=experiments/ladder.py:tiny_0",
                    "--workdir=/tmp/run"], "must be a gs:// folder"),
    ("launch.ladder", [a for a in PAPER_TPU if not a.startswith("--project")], "needs --project and --zone"),
    ("launch.ladder", [a for a in PAPER_TPU if not a.startswith("--zone")], "needs --project and --zone"),
    ("launch.ladder", PAPER_TPU + ["--workdir=/tmp/ladder"], "must be a gs:// folder"),
    ("launch.ladder", PAPER_TPU[:5], "add --set data.tokenizer=gs://"),
    ("launch.ladder", ["--ladder=huge", "--workdir=/tmp/x"], "unknown ladder 'huge'"),
    ("launch.ladder", ["--ladder=paper", "--backend=local", "--workdir=/tmp/x"], "the local backend runs CPU stages"),
    ("launch.ladder", ["--ladder={bad}:bad", "--workdir=/tmp/x"],
     "stage tiny_1: cannot grow tiny_0 into tiny_1: d_model"),
    ("launch.ladder", ["--ladder={v4_12}:odd", "--backend=tpu", "--workdir=gs://b/x", "--project=p", "--zone=z"],
     "the tpu backend ships this repository's"),
    ("launch.ladder", ["--ladder=experiments/ladder.py:TINY", "--backend=tpu", "--workdir=gs://b/x", "--project=p",
                       "--zone=z"], "stage tiny_0: unknown accelerator type 'cpu'"),
])
def test_bad_flags_fail_before_any_gcloud_call(fake, tmp_path, module, args, phrase):
  (tmp_path / "bad.py").write_text(BAD_LADDER.format(name="bad", accelerator=""))
  (tmp_path / "v4_12.py").write_text(BAD_LADDER.format(name="odd", accelerator=", accelerator='v4-12'"))
  args = [a.format(bad=tmp_path / "bad.py", v4_12=tmp_path / "v4_12.py") for a in args]
  assert_one_error_line(run_cli(module, *args), phrase)
  assert fake.calls() == []


def test_the_paper_ladder_dry_run_prints_every_command_in_order(fake):
  result = run_cli("launch.ladder", *PAPER_TPU, "--provisioning=spot", "--dry_run")
  assert result.returncode == 0, result.stderr[-2000:]
  assert fake.calls() == []                                  # printed, not run
  commands = [line for line in result.stdout.splitlines() if line.startswith("gcloud ")]
  kinds = []
  for line in commands:
    words = line.split()
    kind = words[2] if words[1] == "storage" else words[4]
    if kind == "ssh":
      kind = next(w for w in ("tokenformer_jax.cli.grow", "tokenformer_jax.cli.train", "pip install", "storage cp")
                  if w in line)
    kinds.append(kind)
  first = ["ls", "create", "scp", "pip install", "tokenformer_jax.cli.train", "storage cp", "delete"]
  grown = ["ls", "ls", "create", "scp", "pip install", "tokenformer_jax.cli.grow", "storage cp",
           "tokenformer_jax.cli.train", "storage cp", "delete"]
  assert kinds == first + grown * 3
  out = result.stdout
  assert ("gcloud compute tpus tpu-vm create tokenformer-paper-124m --zone=us-central2-b --project=proj "
          "--accelerator-type=v4-64 --version=tpu-ubuntu2204-base --spot") in out
  assert "gcloud storage ls gs://bkt/ladder/paper_1_4b/checkpoints/57221/commit_success.txt" in out
  assert ("tokenformer_jax.cli.grow --src=gs://bkt/ladder/paper_757m --step=57221 --config=experiments/ladder.py:"
          "paper_1_4b --dst=gs://bkt/ladder/paper_1_4b_grown --init=zero_keys --seed=0 --overwrite") in out
  assert ("tokenformer_jax.cli.train --config=experiments/ladder.py:paper_354m --workdir=gs://bkt/ladder/paper_354m "
          "--init_from=gs://bkt/ladder/paper_354m_grown --set=data.tfds_data_dir=gs://bkt/tfds") in out
  assert "# stage paper_124m: 572,205 steps × 524,288 tokens (300B) on v4-64, from scratch" in out
  assert "# stage paper_757m: 57,221 steps × 524,288 tokens (30B) on v4-128, grown from paper_354m (zero_keys)" in out


def test_a_rerun_tpu_ladder_skips_done_stages_and_adopts_a_running_job(fake):
  done = lambda stage, step: {"stdout": checkpoint_url(f"gs://bkt/ladder/{stage}", step) + "\n"}
  fake.script([
      say(["storage", "ls", "paper_124m/"], done("paper_124m", 572205)),
      say(["storage", "ls", "paper_354m/"], NO_OBJECTS, done("paper_354m", 57221)),
      say(["storage", "ls", "paper_354m_grown/"], done("paper_354m_grown", 0)),
      say(["storage", "ls", "paper_757m/"], done("paper_757m", 57221)),
      say(["storage", "ls", "paper_1_4b/"], done("paper_1_4b", 57221)),
      say(["tpu-vm", "delete"], NOT_FOUND),
      say(["tpu-vm", "describe"], state("READY")),
      say(["ssh", "ALIVE"], {"stdout": "paper_354m.train ALIVE on w-0\n"},   # adopted; then it exits
          {"stdout": "paper_354m.train DEAD on w-0\n"}),
  ])
  result = run_cli("launch.ladder", *PAPER_TPU, "--poll_s=0")
  assert result.returncode == 0, result.stderr[-2000:]
  tpu = lambda stage: gcloud.TpuSpec(f"tokenformer-{stage}", "us-central2-b", "proj", "v4-64")
  ls = lambda stage, step: ["gcloud", "storage", "ls", checkpoint_url(f"gs://bkt/ladder/{stage}", step)]
  assert fake.calls() == [
      ls("paper_124m", 572205), gcloud.delete(tpu("paper-124m")),                  # done: make sure its TPU is gone
      ls("paper_354m", 57221), ls("paper_354m_grown", 0),                          # not done, but grown
      gcloud.describe_state(tpu("paper-354m")),                                    # READY, and the job runs:
      gcloud.ssh(tpu("paper-354m"), gcloud.alive_script("paper_354m.train")),      # adopt it, don't restart it
      gcloud.describe_state(tpu("paper-354m")),                                    # the watch: it has exited
      gcloud.ssh(tpu("paper-354m"), gcloud.alive_script("paper_354m.train")),
      ls("paper_354m", 57221),                                                     # and it is done
      gcloud.ssh(tpu("paper-354m"), gcloud.collect_script("paper_354m.train", "gs://bkt/ladder/logs")),
      gcloud.delete(tpu("paper-354m")),
      ls("paper_757m", 57221), gcloud.delete(gcloud.TpuSpec("tokenformer-paper-757m", "us-central2-b", "proj",
                                                            "v4-128")),
      ls("paper_1_4b", 57221), gcloud.delete(gcloud.TpuSpec("tokenformer-paper-1-4b", "us-central2-b", "proj",
                                                            "v4-128")),
  ]
  assert "# ladder done: gs://bkt/ladder/paper_1_4b/checkpoints/57221" in result.stdout


# Ladders --------------------------------------------------------------------------------------------------------
def test_ladder_definitions():
  _, paper = load_stages("paper", [])
  assert [s.name for s in paper] == ["paper_124m", "paper_354m", "paper_757m", "paper_1_4b"]
  assert [s.tokens for s in paper] == [300 * 10**9] + [30 * 10**9] * 3
  assert [s.steps for s in paper] == [572205, 57221, 57221, 57221]
  assert all(s.config.global_batch == 512 and s.config.data.seq_len == 1024 for s in paper)
  optim = paper[0].config.optim
  assert (optim.learning_rate, optim.warmup_steps, optim.weight_decay, optim.min_lr_ratio) == (6e-4, 2000, 0.1, 0.0)
  assert paper[0].config.data.tfds_name == "openwebtext"
  assert all(s.config.model.norm_scale_tokens == paper[0].config.model.param_tokens for s in paper)
  check_ladder(load_stages("paper", ["data.tfds_data_dir=gs://b/t", "data.tokenizer=gs://b/t.model"])[1], "tpu")
  _, tiny = load_stages("tiny", [])
  check_ladder(tiny, "local")
  assert [s.init for s in tiny] == ["scratch", "zero_keys", "zero_keys"]


def test_the_local_ladder_dry_run(tmp_path):
  result = run_cli("launch.ladder", "--ladder=tiny", "--backend=local", f"--workdir={tmp_path}", "--dry_run")
  assert result.returncode == 0, result.stderr[-2000:]
  commands = [line for line in result.stdout.splitlines() if line.startswith("python ")]
  assert commands == [
      f"python -m tokenformer_jax.cli.train --config=experiments/ladder.py:tiny_0 --workdir={tmp_path}/tiny_0",
      f"python -m tokenformer_jax.cli.grow --src={tmp_path}/tiny_0 --step=30 --config=experiments/ladder.py:tiny_1 "
      f"--dst={tmp_path}/tiny_1_grown --init=zero_keys --seed=0 --overwrite",
      f"python -m tokenformer_jax.cli.train --config=experiments/ladder.py:tiny_1 --workdir={tmp_path}/tiny_1 "
      f"--init_from={tmp_path}/tiny_1_grown",
      f"python -m tokenformer_jax.cli.grow --src={tmp_path}/tiny_1 --step=20 --config=experiments/ladder.py:tiny_2 "
      f"--dst={tmp_path}/tiny_2_grown --init=zero_keys --seed=0 --overwrite",
      f"python -m tokenformer_jax.cli.train --config=experiments/ladder.py:tiny_2 --workdir={tmp_path}/tiny_2 "
      f"--init_from={tmp_path}/tiny_2_grown",
  ]
  assert not any(tmp_path.iterdir())


GROW_CLI = REPO / "tokenformer_jax" / "cli" / "grow.py"


def final_params(run_dir, stage):
  from tokenformer_jax.checkpoint import RunCheckpoints
  from tokenformer_jax.model import abstract_params
  return RunCheckpoints(run_dir, read_only=True).restore_params(abstract_params(stage.config.model))


def metrics(run_dir):
  return [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not GROW_CLI.exists(), reason="WAITING FOR tokenformer_jax/cli/grow.py: the local ladder "
                                                  "grows stages with it")
def test_the_local_ladder_runs_end_to_end_and_a_killed_run_finishes_the_same(tmp_path):
  _, tiny = load_stages("tiny", [])
  ladder = lambda workdir: ["launch.ladder", "--ladder=tiny", "--backend=local", f"--workdir={workdir}"]
  whole = tmp_path / "whole"
  result = run_cli(*ladder(whole), timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  for stage in tiny:
    assert max(int(p.name) for p in (whole / stage.name / "checkpoints").iterdir()) == stage.steps
  assert (whole / "tiny_1_grown" / "checkpoints" / "0").is_dir() and (whole / "logs" / "tiny_2.train.log").exists()

  again = run_cli(*ladder(whole))                       # idempotent: everything is done
  assert again.returncode == 0 and again.stdout.count("is done") == 3 and "$ python" not in again.stdout

  killed = tmp_path / "killed"                          # SIGKILL the runner and its child mid-way through tiny_1
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  process = subprocess.Popen([sys.executable, "-m", *ladder(killed)], cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (killed / "tiny_1" / "checkpoints" / "10").exists() and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert process.poll() is None, "the ladder finished before it could be killed"
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()
  assert not (killed / "tiny_2").exists()
  resumed = run_cli(*ladder(killed), timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "tiny_0 is done" in resumed.stdout                              # not trained again,
  assert f"--dst={killed}/tiny_1_grown" not in resumed.stdout             # nor grown again,
  assert f"--dst={killed}/tiny_2_grown" in resumed.stdout                 # and the rest goes on
  assert "resumed" in (killed / "logs" / "tiny_1.train.log").read_text()
  for a, b in zip(jax.tree.leaves(final_params(whole / "tiny_2", tiny[2])),
                  jax.tree.leaves(final_params(killed / "tiny_2", tiny[2])), strict=True):
    np.testing.assert_array_equal(a, b)
  losses = lambda run: {m["step"]: m["train/loss"] for m in metrics(run) if "train/loss" in m}
  assert losses(whole / "tiny_2") == losses(killed / "tiny_2")
