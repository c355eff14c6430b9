"""The launcher: exact gcloud command lines, retries, the watch's decisions on every fault, budgets, the lock file,
preflight, logs, and the ladder end to end.

tests/fake_gcloud.py plays gcloud: a strict, scripted state machine of TPU VMs, queued resources, jobs and GCS on a
fake clock (only the launcher's sleeps advance it; nothing here really waits). Most tests call it in-process
through the runner's `execute`; the CLI tests put it on PATH as `gcloud`. The local ladder runs on CPU.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from launch import faults, gcloud, lock, worker
from launch.faults import Budget, Verdict
from launch.ladder import TpuBackend, check_ladder, fallback_stages, load_stages, run_ladder, slice_groups
from launch.runner import LaunchError, Runner, display
from launch.tpu import (Job, Limits, TpuVm, WorkerSetup, checkpoint_url, committed, ensure_lock, follow_logs,
                        preflight)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from fake_gcloud import FakeCloud  # noqa: E402
from helpers import run_cli, run_params  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
  """The launcher's temporary files (archives, startup-scripts), here and in the CLIs run from here, in tmp_path."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  monkeypatch.setenv("TMPDIR", str(tmp_path))


SPEC = gcloud.TpuSpec(name="tf-test", zone="us-central2-b", project="proj", accelerator="v4-32")
SPOT = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-32", provisioning="spot", queued=True)
WHERE = ["--zone=us-central2-b", "--project=proj"]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]
LOCK = "# python 3.11.7\n# tokenformer_jax[tpu] dependencies, written by launch.lock\njax==0.10.2\nlibtpu==0.0.42.1\n"
SETUP = WorkerSetup("gs://b/code/src-0123.tar.gz", LOCK, "3.11.7")


# Command lines --------------------------------------------------------------------------------------------------
def test_tpu_vm_commands_follow_the_documented_syntax():
  assert gcloud.create(SPEC) == TPU_VM + ["create", "tf-test", *WHERE, "--accelerator-type=v4-32",
                                          "--version=tpu-ubuntu2204-base"]
  spot = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-64", provisioning="spot")
  assert gcloud.create(spot, "/tmp/s.sh") == TPU_VM + ["create", "tf-test", *WHERE, "--accelerator-type=v4-64",
                                                       "--version=tpu-ubuntu2204-base", "--spot",
                                                       "--metadata-from-file=startup-script=/tmp/s.sh"]
  reserved = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-8", provisioning="reserved")
  assert gcloud.create(reserved)[-1] == "--reserved"
  assert gcloud.describe_node(SPEC) == TPU_VM + ["describe", "tf-test", *WHERE,
                                                 "--format=json(state,health,healthDescription)"]
  assert gcloud.delete(SPEC) == TPU_VM + ["delete", "tf-test", *WHERE, "--quiet"]
  assert gcloud.ssh(SPEC, "hostname") == TPU_VM + ["ssh", "tf-test", *WHERE, "--worker=all", "--command=hostname",
                                                   "--quiet"]
  assert gcloud.describe_project("proj") == ["gcloud", "projects", "describe", "proj", "--format=value(projectId)"]
  assert gcloud.describe_accelerator(SPEC) == ["gcloud", "compute", "tpus", "accelerator-types", "describe", "v4-32",
                                               *WHERE, "--format=value(type)"]
  assert gcloud.storage_cp("a", "gs://b/a") == ["gcloud", "storage", "cp", "a", "gs://b/a"]
  assert SPEC.hosts == 4 and SPEC.chips == 16


def test_queued_resource_commands_follow_the_documented_syntax():
  assert gcloud.create(SPOT, "/tmp/s.sh") == QUEUED + [
      "create", "tf-test", "--node-id=tf-test", *WHERE, "--accelerator-type=v4-32",
      "--runtime-version=tpu-ubuntu2204-base", "--spot", "--metadata-from-file=startup-script=/tmp/s.sh"]
  best_effort = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-32", provisioning="best-effort", queued=True,
                               valid_until="6h")
  assert gcloud.create(best_effort) == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "tf-test",
                                        "--node-id=tf-test", *WHERE, "--accelerator-type=v4-32",
                                        "--runtime-version=tpu-ubuntu2204-base", "--best-effort",
                                        "--valid-until-duration=6h"]
  multi = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-64", queued=True, slices=2)
  assert gcloud.create(multi) == QUEUED + ["create", "tf-test", "--node-count=2", "--node-prefix=tf-test", *WHERE,
                                           "--accelerator-type=v4-64", "--runtime-version=tpu-ubuntu2204-base"]
  assert multi.nodes == ["tf-test-0", "tf-test-1"] and multi.chips == 64 and multi.hosts == 16
  assert gcloud.ssh(multi, "hostname") == QUEUED + ["ssh", "tf-test", *WHERE, "--node=all", "--worker=all",
                                                    "--command=hostname", "--quiet"]
  assert gcloud.describe_queued(SPOT) == QUEUED + ["describe", "tf-test", *WHERE, "--format=json(state)"]
  assert gcloud.delete(SPOT) == QUEUED + ["delete", "tf-test", *WHERE, "--force", "--quiet"]


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(accelerator="v4-12"), "unknown accelerator type 'v4-12'"),
    (dict(accelerator="v5e-8"), "unknown accelerator type 'v5e-8'"),
    (dict(project=""), "needs --project and --zone"),
    (dict(zone=""), "needs --project and --zone"),
    (dict(name="Bad_Name"), "lowercase letters"),
    (dict(provisioning="best-effort"), "only for queued resources"),
    (dict(provisioning="cheap"), "--provisioning must be one of"),
    (dict(slices=2), "need queued resources"),
    (dict(queued=True, valid_until="6 hours"), "a duration such as"),
])
def test_bad_tpu_specs_are_refused(kwargs, phrase):
  with pytest.raises(ValueError, match=phrase.replace("(", r"\(")):
    gcloud.TpuSpec(**{**dict(name="tf", zone="z", project="p", accelerator="v4-8"), **kwargs})


def test_worker_scripts():
  start = worker.start_script("s.train", ["python", "-m", "tokenformer_jax.cli.train", "--set=data.train_files=a b"],
                              {"XLA_FLAGS": "--xla_dump_to=/tmp/d x", "JAX_COMPILATION_CACHE_DIR": "gs://b/c"})
  assert start == (worker.stop_script("s.train") + "; mkdir -p $HOME/tokenformer-logs; cd /opt/tokenformer/src || "
                   "exit 1; export JAX_COMPILATION_CACHE_DIR=gs://b/c; export XLA_FLAGS='--xla_dump_to=/tmp/d x'; "
                   "export PYTHONPATH=/opt/tokenformer/src; nohup /opt/tokenformer/venv/bin/python -m "
                   "tokenformer_jax.cli.train '--set=data.train_files=a b' >> "
                   "$HOME/tokenformer-logs/s.train.$(hostname).log 2>&1 < /dev/null & "
                   "echo $! > $HOME/tokenformer-logs/s.train.pid")
  assert worker.stop_script("j", 5) == (
      'P=$(cat $HOME/tokenformer-logs/j.pid 2>/dev/null); if [ -n "$P" ] && kill -0 "$P" 2>/dev/null; then kill "$P"; '
      'for i in $(seq 5); do kill -0 "$P" 2>/dev/null || break; sleep 1; done; kill -9 "$P" 2>/dev/null; fi')
  synced = worker.start_script("j", ["python", "x.py"], logs_url="gs://b/logs/", sync_s=30)
  assert synced.startswith(worker.start_script("j", ["python", "x.py"]) + "; LOG=$HOME/tokenformer-logs/j.$(hostname)"
                           ".log URL=gs://b/logs/j.$(hostname).$(cut -c1-8 /proc/sys/kernel/random/boot_id).log ")
  assert "sleep 30; done; gcloud storage cp" in synced
  assert worker.alive_script("j") == ('if kill -0 "$(cat $HOME/tokenformer-logs/j.pid 2>/dev/null)" 2>/dev/null; '
                                      'then echo "j ALIVE on $(hostname)"; else echo "j DEAD on $(hostname)"; fi')
  assert display(gcloud.ssh(SPEC, "echo 'hi'")) == ("gcloud compute tpus tpu-vm ssh tf-test --zone=us-central2-b "
                                                    "--project=proj --worker=all --command='echo '\"'\"'hi'\"'\"'' "
                                                    "--quiet")


def test_the_code_archive_is_unique_and_holds_the_package():
  import tarfile
  from launch.tpu import build_archive, code_digest
  first, second = build_archive(), build_archive()
  assert first != second                                    # two launchers never share one file
  names = tarfile.open(first).getnames()
  for needed in ("setup.py", "tokenformer_jax/config.py", "tokenformer_jax/data/corpus/python-docs-bpe2048.model",
                 "experiments/ladder.py", "launch/tpu.py"):
    assert needed in names
  assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
  assert code_digest() == code_digest() and len(code_digest()) == 16


# The runner -----------------------------------------------------------------------------------------------------
def scripted(*answers):
  """An `execute` answering each call with the next of `answers` (rc, stderr); records the calls."""
  calls, queue = [], list(answers)

  def execute(argv):
    calls.append(list(argv))
    rc, stderr = queue.pop(0)
    return type("R", (), {"returncode": rc, "stdout": "", "stderr": stderr})()
  return execute, calls


UNAVAILABLE = "ERROR: (gcloud.compute.tpus.tpu-vm.create) UNAVAILABLE: The service is currently unavailable.\n"


def test_transient_failures_are_retried_with_exponential_backoff_and_permanent_ones_are_one_line():
  execute, calls = scripted((1, UNAVAILABLE), (1, "ERROR: Rate Limit Exceeded\n"), (0, ""))
  sleeps, lines = [], []
  assert Runner(sleep=sleeps.append, say=lines.append, execute=execute).run(gcloud.create(SPEC)).returncode == 0
  assert calls == [gcloud.create(SPEC)] * 3 and sleeps == [10.0, 20.0]
  assert sum("transient failure" in line for line in lines) == 2
  execute, calls = scripted((1, "Creating TPU...\nERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: "
                                "Permission 'tpu.nodes.create' denied\n"))
  with pytest.raises(LaunchError) as error:
    Runner(sleep=sleeps.append, say=lines.append, execute=execute).run(gcloud.create(SPEC))
  assert str(error.value) == ("`gcloud compute tpus tpu-vm create tf-test` failed (exit 1): ERROR: (gcloud.compute."
                              "tpus.tpu-vm.create) PERMISSION_DENIED: Permission 'tpu.nodes.create' denied")
  execute, calls = scripted(*[(1, UNAVAILABLE)] * 4)
  with pytest.raises(LaunchError, match="still failing after 4 attempts"):
    Runner(attempts=4, sleep=sleeps.append, say=lines.append, execute=execute).run(gcloud.create(SPEC))
  execute, calls = scripted((1, "ERROR: RESOURCE_EXHAUSTED: Quota 'TPUV4' exceeded\n"))
  with pytest.raises(LaunchError, match="Quota"):
    Runner(sleep=sleeps.append, say=lines.append, execute=execute).run(gcloud.create(SPEC))
  assert len(calls) == 1


def test_the_fake_gcloud_refuses_what_gcloud_would():
  fake = FakeCloud()
  create = gcloud.create(SPEC)
  assert fake.execute(create).returncode == 0
  for argv in (create[:-1] + ["--version=tpu-ubuntu2204-base", "--preemptible-ish"],      # an unknown flag
               [a for a in create if not a.startswith("--zone")],                          # a required one missing
               create + ["--spot=yes"],                                                    # a value on a switch
               ["gcloud", "compute", "tpus", "tpu-vm", "start", "tf-test", *WHERE]):       # a verb it does not use
    assert fake.execute(argv).returncode == 2
  assert len(fake.state["refused"]) == 4


def test_every_state_and_health_value_has_a_decision():
  node_states = ["STATE_UNSPECIFIED", "CREATING", "READY", "RESTARTING", "REIMAGING", "DELETING", "REPAIRING",
                 "STOPPED", "STOPPING", "STARTING", "PREEMPTED", "TERMINATED", "HIDING", "HIDDEN", "UNHIDING",
                 "UNKNOWN"]
  assert sorted(faults.NODE_STATES) == sorted(node_states)
  assert sorted(faults.QUEUED_STATES) == sorted(["STATE_UNSPECIFIED", "CREATING", "ACCEPTED", "PROVISIONING",
                                                 "FAILED", "DELETING", "ACTIVE", "SUSPENDING", "SUSPENDED",
                                                 "WAITING_FOR_RESOURCES"])
  node = lambda **kw: faults.node_status(json.dumps(kw)).verdict
  assert node(state="READY", health="HEALTHY") is Verdict.USABLE
  assert node(state="READY") is Verdict.USABLE                      # not reported yet: the ssh probe decides
  for health in ("TIMEOUT", "UNHEALTHY_TENSORFLOW", "UNHEALTHY_MAINTENANCE", "SOMETHING_NEW"):
    assert node(state="READY", health=health) is Verdict.UNHEALTHY
  assert [node(state=s) for s in ("PREEMPTED", "TERMINATED", "REPAIRING", "UNKNOWN", "NEW_STATE")] == [
      Verdict.PREEMPTED, Verdict.LOST, Verdict.WAIT, Verdict.UNKNOWN, Verdict.UNKNOWN]
  assert faults.node_status("Traceback (most recent call last):").verdict is Verdict.UNKNOWN
  failed = faults.queued_status(json.dumps({"state": {"state": "FAILED", "failedData": {"error": {
      "message": "Insufficient capacity for spot"}}}}))
  assert failed.verdict is Verdict.FAILED and failed.detail == "FAILED: Insufficient capacity for spot"
  assert faults.queued_status('{"state": {"state": "SUSPENDED"}}').verdict is Verdict.PREEMPTED
  assert faults.queued_status("{}").verdict is Verdict.UNKNOWN


# Watching a job on a TPU: each fault, played by the fake gcloud -------------------------------------------------
DONE_URL = checkpoint_url("gs://b/s", 100)
TRAIN = ["python", "-m", "tokenformer_jax.cli.train", "--config=experiments/ladder.py:s", "--workdir=gs://b/s"]


def play(scenario, spec=SPOT, budgets=(), keep_on_failure=False, **limits):
  """Run the s.train job on `spec` under `scenario`; returns (fake, lines, error or None)."""
  fake = FakeCloud(scenario)
  lines = []
  runner = Runner(execute=fake.execute, sleep=fake.sleep, clock=fake.now, say=lines.append)
  vm = TpuVm(spec, runner, setup=SETUP, limits=Limits(**{"poll_s": 60, **limits}), keep_on_failure=keep_on_failure)
  job = Job("s.train", TRAIN, lambda: committed(runner, DONE_URL), logs_to="gs://b/logs", env={"A": "1"})
  try:
    vm.run_job(job, list(budgets))
  except LaunchError as error:
    return fake, lines, str(error)
  finally:
    assert not fake.state.get("refused"), fake.state["refused"]   # every command line was one gcloud accepts
  return fake, lines, None


def finishes(after_s, **more):
  return {"s.train": [{"runs_s": after_s, "then": "finish", "writes": [DONE_URL]}], **more}


def kinds(fake):
  """The launcher's calls as words: create, delete, setup, start."""
  out = []
  for call in fake.state["calls"]:
    verb = call[5] if call[1] == "alpha" else (call[4] if call[1] == "compute" and len(call) > 4 else None)
    command = next((a for a in call if a.startswith("--command=")), "")
    if verb in ("create", "delete"):
      out.append(verb)
    elif "tokenformer-setup.sh" in command:
      out.append("setup")
    elif "nohup" in command:
      out.append("start")
  return out


def test_a_preempted_spot_tpu_is_recreated_through_a_queued_resource_and_the_job_resumes():
  fake, lines, error = play({"jobs": finishes(3000), "events": [{"at": 1000, "node": "tf-test", "preempt": True}]})
  assert error is None
  assert kinds(fake) == ["create", "setup", "start", "delete", "create", "setup", "start"]
  assert all(c[:4] == QUEUED[:4] for c in fake.calls("create"))
  assert any("SUSPENDED: preempted" in line for line in lines) and lines[-1] == "[tf-test] s.train is done"
  node = fake.state["nodes"]["tf-test"]
  assert node["startup_script"] == SETUP.script      # a recreated VM sets itself up at boot
  assert "export A=1; " in node["jobs"]["s.train"]["command"]


def test_health_flapping_is_waited_out_and_lasting_ill_health_recreates():
  flap = []   # three unhealthy spells of 3 min: 9 min in all, but each shorter than the 5 min of grace
  for start in (600, 900, 1200):
    flap += [{"at": start, "node": "tf-test", "health": "TIMEOUT", "description": "the TPU is unresponsive"},
             {"at": start + 180, "node": "tf-test", "health": "HEALTHY"}]
  fake, lines, error = play({"jobs": finishes(1500), "events": flap}, unhealthy_grace_s=300)
  assert error is None and kinds(fake) == ["create", "setup", "start"]   # no delete: it recovered each time
  assert sum("READY/TIMEOUT: the TPU is unresponsive: waiting up to 5 min" in line for line in lines) == 3
  sick = [{"at": 600, "node": "tf-test", "health": "UNHEALTHY_MAINTENANCE"}]
  fake, lines, error = play({"jobs": finishes(1500), "events": sick}, unhealthy_grace_s=600)
  assert error is None and kinds(fake) == ["create", "setup", "start", "delete", "create", "setup", "start"]
  assert any("READY/UNHEALTHY_MAINTENANCE for 10 min: deleting it" in line for line in lines)


def test_an_unknown_state_is_waited_on_for_a_bounded_time_then_recreated():
  fake, lines, error = play({"jobs": finishes(2000), "events": [{"at": 600, "node": "tf-test", "state": "UNKNOWN"}]},
                            unknown_timeout_s=1200)
  assert error is None and kinds(fake) == ["create", "setup", "start", "delete", "create", "setup", "start"]
  recreate = next(line for line in lines if "deleting it" in line)
  assert recreate.startswith("[tf-test] UNKNOWN/HEALTHY for 20 min: deleting it to create it again (1/5)")


def test_a_failed_queued_resource_shows_its_reason_retries_transient_ones_and_stops_on_the_rest():
  transient = {"fail_after": 300, "error": "Internal error: please try again"}
  fake, lines, error = play({"jobs": finishes(600), "queued_outcomes": [transient]})
  assert error is None and kinds(fake) == ["create", "delete", "create", "setup", "start"]
  assert any("FAILED: Internal error: please try again: deleting it" in line for line in lines)
  quota = {"fail_after": 300, "error": "Quota 'TPUV4PodPerProjectPerZoneForTPUAPI' exhausted"}
  fake, lines, error = play({"jobs": finishes(600), "queued_outcomes": [quota]})
  assert error == ("queued resource tf-test FAILED: Quota 'TPUV4PodPerProjectPerZoneForTPUAPI' exhausted; "
                   "TPU tf-test deleted")
  assert kinds(fake) == ["create", "delete"] and not fake.state["queued"]
  deadline = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-32", provisioning="spot", queued=True,
                            valid_until="1h")
  fake, lines, error = play({"jobs": finishes(600), "capacity_from": 7200}, spec=deadline)
  assert error.startswith("queued resource tf-test FAILED: Queued resource request expired")
  assert error.endswith("(--valid_until=1h); TPU tf-test deleted") and 3600 <= fake.now() <= 3660


def test_an_hour_without_capacity_is_waited_out_directly_or_in_the_queue():
  on_demand = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-32")
  fake, lines, error = play({"jobs": finishes(600), "capacity_from": 3600}, spec=on_demand)
  assert error is None and fake.now() >= 3600 + 600
  assert kinds(fake).count("create") == 61 and kinds(fake)[-3:] == ["create", "setup", "start"]
  assert sum("no capacity now" in line for line in lines) == 60
  fake, lines, error = play({"jobs": finishes(600), "capacity_from": 3600})   # spot: queued, waits in the queue
  assert error is None and kinds(fake) == ["create", "setup", "start"] and fake.now() >= 3600 + 600
  fake, lines, error = play({"jobs": finishes(600), "capacity_from": 3600}, spec=on_demand, ready_timeout_s=1800)
  assert error.startswith("TPU tf-test is still not usable (absent) after 0.5 h")
  assert error.endswith("; no TPU tf-test is left")                       # never created: nothing to delete


def test_a_job_that_crashes_on_a_healthy_tpu_is_restarted_there_a_bounded_number_of_times():
  crash = {"runs_s": 600, "then": "crash"}
  fake, lines, error = play({"jobs": {"s.train": [crash, {"runs_s": 600, "then": "finish", "writes": [DONE_URL]}]}})
  assert error is None and kinds(fake) == ["create", "setup", "start", "start"]    # no delete, no second setup
  assert any("s.train died on a healthy TPU: restarting it there (1/3)" in line for line in lines)
  fake, lines, error = play({"jobs": {"s.train": [crash]}}, max_restarts=2)
  assert error == ("s.train died 3 times on a healthy tf-test without finishing (--max_restarts=2); its logs: "
                   "gs://b/logs; TPU tf-test deleted")
  assert kinds(fake) == ["create", "setup", "start", "start", "start", "delete"] and not fake.state["nodes"]


def test_three_preemptions_against_a_budget_of_two_stop_with_one_line_and_no_tpu_left():
  preempt = [{"at": t, "node": "tf-test", "preempt": True} for t in (1000, 2000, 3000)]
  ladder = Budget("the ladder", max_preemptions=10)
  fake, lines, error = play({"jobs": finishes(10**5), "events": preempt},
                            budgets=[Budget("stage s", max_preemptions=2), ladder])
  assert error == ("stage s was preempted 3 times, over its budget of --max_preemptions=2; TPU tf-test deleted")
  assert ladder.preemptions == 3 and not fake.state["queued"] and not fake.state["nodes"]


def test_a_tpu_hours_budget_stops_the_stage():
  fake, lines, error = play({"jobs": finishes(10**5)}, budgets=[Budget("stage s", max_tpu_hours=16)])
  assert error.startswith("stage s used 16.") and error.endswith("TPU chip-hours, over its budget of "
                                                                 "--max_tpu_hours=16; TPU tf-test deleted")
  assert 3600 <= fake.now() <= 3600 + 60             # 16 chips: an hour after it became ACTIVE, to the poll


def test_a_failed_stage_deletes_its_tpu_unless_asked_to_keep_it():
  error_plan = {"s.train": [{"runs_s": 300, "then": "error", "error": "the tokenizer has 2048 pieces"}]}
  fake, lines, error = play({"jobs": error_plan})
  assert error == "s.train failed on tf-test: the tokenizer has 2048 pieces; TPU tf-test deleted"
  assert not fake.state["queued"] and not fake.state["nodes"]
  fake, lines, error = play({"jobs": error_plan, "setup_error": "No solution found when resolving: libtpu==0.0.42.1"})
  assert error == ("`gcloud compute tpus tpu-vm ssh tf-test` failed (exit 1): tokenformer setup FAILED on "
                   "tf-test-w-3: No solution found when resolving: libtpu==0.0.42.1 (see /opt/tokenformer/setup.log "
                   "on the workers); TPU tf-test deleted")
  fake, lines, error = play({"jobs": error_plan}, keep_on_failure=True)
  assert error.endswith("; TPU tf-test kept running (--keep_on_failure); delete it with `python -m launch.tpu delete "
                        "--name=tf-test --project=proj --zone=us-central2-b --queued`")
  assert fake.state["nodes"]["tf-test"]["state"] == "READY"


def test_ssh_failing_on_a_ready_tpu_is_retried_then_recreated_and_publickey_is_retried_after_creation():
  blip = [{"from": 600, "until": 1500}]   # e.g. a host in maintenance; the runner's retries span 5 min of it
  fake, lines, error = play({"jobs": finishes(2500), "ssh_down": blip})
  assert error is None and kinds(fake) == ["create", "setup", "start"]
  assert any("ssh failed on a READY TPU" in line for line in lines)
  fake, lines, error = play({"jobs": finishes(1500), "ssh_down": [{"from": 600, "until": 10**5}]},
                            unhealthy_grace_s=900)
  assert error is None and kinds(fake).count("delete") == 1
  publickey = [{"from": 0, "until": 200, "stderr": "user@10.0.0.2: Permission denied (publickey).\n"}]
  fake, lines, error = play({"jobs": finishes(600), "ssh_down": publickey})
  assert error is None and kinds(fake) == ["create", "setup", "start"]    # refused right after creation, then in
  assert any("transient failure" in line and "publickey" in line for line in lines)


def test_multislice_runs_on_every_node_and_one_preempted_slice_recreates_the_queued_resource():
  multi = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-64", provisioning="spot", queued=True, slices=2)
  fake, lines, error = play({"jobs": finishes(3000), "events": [{"at": 1000, "node": "tf-test-1", "preempt": True}]},
                            spec=multi)
  assert error is None and kinds(fake) == ["create", "setup", "start", "delete", "create", "setup", "start"]
  assert fake.calls("queued-resources", "create")[0][6:8] == ["--node-count=2", "--node-prefix=tf-test"]
  starts = [c for c in fake.state["calls"] if any("nohup" in a for a in c)]
  assert all(c[:6] == QUEUED + ["ssh", "tf-test"] and "--node=all" in c for c in starts)
  assert sorted(fake.state["nodes"]) == ["tf-test-0", "tf-test-1"]
  assert all(n["jobs"]["s.train"]["status"] == "DEAD" for n in fake.state["nodes"].values())   # ran on both
  assert any("tf-test-1 PREEMPTED: preempted" in line or "SUSPENDED: preempted" in line for line in lines)


def test_budgets_count_across_reruns_of_the_launcher():
  from launch.tpu import ledger_budgets
  preempt = [{"at": 1000, "node": "tf-test", "preempt": True}]
  fake, lines = FakeCloud({"jobs": {"s.train": [{"runs_s": 1500, "then": "crash"}]}, "events": preempt}), []
  runner = Runner(execute=fake.execute, sleep=fake.sleep, clock=fake.now, say=lines.append)
  budgets, ladder, save = ledger_budgets(runner, "gs://b/w", ["s"], 1, None)
  vm = TpuVm(SPOT, runner, setup=SETUP, limits=Limits(poll_s=60, max_restarts=0))
  vm.ledger = save
  with pytest.raises(LaunchError, match="died 1 times"):                    # the launcher stops for another reason
    vm.run_job(Job("s.train", TRAIN, lambda: committed(runner, DONE_URL)), [budgets["s"], ladder])
  usage = json.loads(fake.state["objects"]["gs://b/w/launcher/usage.json"])
  assert usage["s"]["preemptions"] == 1 and usage["s"]["tpu_hours"] > 0
  fake.scenario["jobs"] = finishes(10**5)
  fake.scenario["events"].append({"at": fake.now() + 1000, "node": "tf-test", "preempt": True})
  budgets, ladder, save = ledger_budgets(runner, "gs://b/w", ["s"], 1, None)  # the rerun starts from what was spent
  assert budgets["s"].preemptions == ladder.preemptions == 1
  with pytest.raises(LaunchError, match=r"stage s was preempted 2 times, over its budget of --max_preemptions=1"):
    vm.run_job(Job("s.train", TRAIN, lambda: committed(runner, DONE_URL)), [budgets["s"], ladder])


# Ladders on TPUs ------------------------------------------------------------------------------------------------
def paper_backend(fake, lines):
  _, stages = load_stages("paper", ["data.tfds_data_dir=gs://bkt/tfds", "data.tokenizer=gs://bkt/t.model"])
  runner = Runner(execute=fake.execute, sleep=fake.sleep, clock=fake.now, say=lines.append)
  vms = {}
  for group in slice_groups(stages):
    spec = gcloud.TpuSpec(f"tokenformer-{group[0].name.replace('_', '-')}", "us-central2-b", "proj",
                          group[0].accelerator, provisioning="spot", queued=True)
    vm = TpuVm(spec, runner, setup=SETUP, limits=Limits(poll_s=600))
    vms.update({s.name: vm for s in group})
  budgets = {s.name: Budget(f"stage {s.name}") for s in stages}
  return stages, TpuBackend("gs://bkt/ladder", runner, vms, {}, budgets, Budget("the ladder"))


def test_consecutive_stages_on_the_same_slice_type_share_one_tpu_and_none_is_left_running():
  def done(stage, step=None):
    return checkpoint_url(f"gs://bkt/ladder/{stage}", 0 if stage.endswith("_grown") else step)
  jobs = {"paper_124m.train": [{"runs_s": 3600, "then": "finish", "writes": [done("paper_124m", 572205)]}]}
  for stage in ("paper_354m", "paper_757m", "paper_1_4b"):
    jobs[f"{stage}.grow"] = [{"runs_s": 600, "then": "finish", "writes": [done(f"{stage}_grown")]}]
    jobs[f"{stage}.train"] = [{"runs_s": 3600, "then": "finish", "writes": [done(stage, 57221)]}]
  fake, lines = FakeCloud({"jobs": jobs}), []
  stages, backend = paper_backend(fake, lines)
  run_ladder(stages, backend, "gs://bkt/ladder", [], say=lines.append)
  assert not fake.state.get("refused")
  creates = [c[5] for c in fake.calls("queued-resources", "create")]
  deletes = [c[5] for c in fake.calls("queued-resources", "delete")]
  assert creates == deletes == ["tokenformer-paper-124m", "tokenformer-paper-757m"]
  assert "[tokenformer-paper-124m] kept for paper_354m (same slice)" in lines
  assert kinds(fake).count("setup") == 2 and not fake.state["queued"] and not fake.state["nodes"]


@pytest.mark.slow
def test_the_versions_installed_on_a_recreated_worker_are_the_lock_files(tmp_path):
  fake, lines = FakeCloud(), []
  runner = Runner(execute=fake.execute, sleep=fake.sleep, clock=fake.now, say=lines.append)
  text = ensure_lock(runner, "gs://b/w", lambda: LOCK)                       # the ladder's first start writes it
  assert fake.state["objects"]["gs://b/w/requirements.lock"] == LOCK
  assert ensure_lock(runner, "gs://b/w", lambda: "jax==9.9\n") == LOCK      # ...and later starts reuse it
  preempt = [{"at": 1000, "node": "tf-test", "preempt": True}]
  fake.scenario.update(jobs=finishes(3000), events=preempt)
  vm = TpuVm(SPOT, runner, setup=WorkerSetup("gs://b/code/src-1.tar.gz", text, lock.python_of(text)),
             limits=Limits(poll_s=60))
  vm.run_job(Job("s.train", TRAIN, lambda: committed(runner, DONE_URL)))
  assert len(fake.calls("queued-resources", "create")) == 2
  script = fake.state["nodes"]["tf-test"]["startup_script"]                  # the recreated VM's boot script
  installed = boot_worker(tmp_path, script)
  assert installed["requirements"] == LOCK and installed["python"] == "3.11.7"
  assert installed["src"] == "code of gs://b/code/src-1.tar.gz"
  again = boot_worker(tmp_path, script)                                     # a reboot: already set up, untouched
  assert again["output"].startswith("tokenformer setup done") and again["runs"] == installed["runs"]


STUB_UV = """#!/bin/bash
echo "$@" >> "$TOKENFORMER_ROOT/uv-calls"
case "$1 $2" in
  "python install") echo "$3" > "$TOKENFORMER_ROOT/python-installed" ;;
  "venv --python") mkdir -p "$4/bin" && ln -sf "$(command -v python3)" "$4/bin/python" ;;
  "pip sync") cp "$5" "$TOKENFORMER_ROOT/installed.txt" ;;
esac
"""
STUB_PYTHON3 = """#!/bin/bash
# python3 -m pip install --quiet --target DIR uv==V: install the uv stub
mkdir -p "$6/bin" && cp "$STUBS/uv" "$6/bin/uv" && chmod +x "$6/bin/uv"
"""
STUB_GCLOUD = """#!/bin/bash
# gcloud storage cp gs://... DEST: a tiny code archive
d=$(mktemp -d) && echo "code of $3" > "$d/CODE" && tar -czf "$4" -C "$d" CODE
"""


def boot_worker(tmp_path, script):
  """Run a startup-script as a worker's boot would, with stub uv/python3/gcloud; report what it installed."""
  stubs, root = tmp_path / "stubs", tmp_path / "root"
  stubs.mkdir(exist_ok=True)
  for name, text in (("uv", STUB_UV), ("python3", STUB_PYTHON3), ("gcloud", STUB_GCLOUD)):
    (stubs / name).write_text(text)
    (stubs / name).chmod(0o755)
  (tmp_path / "boot.sh").write_text(script)
  env = {"PATH": f"{stubs}:/usr/bin:/bin", "TOKENFORMER_ROOT": str(root), "STUBS": str(stubs)}
  done = subprocess.run(["bash", str(tmp_path / "boot.sh")], env=env, capture_output=True, text=True, timeout=30)
  assert done.returncode == 0, done.stdout + done.stderr + (root / "setup.log").read_text()
  return {"requirements": (root / "installed.txt").read_text(), "python": (root / "python-installed").read_text()
          .strip(), "src": (root / "src" / "CODE").read_text().strip(), "output": done.stdout,
          "runs": (root / "uv-calls").read_text().count("pip sync")}


def test_the_lock_file_is_the_dependency_closure_with_extras_and_markers():
  class Fake(lock.Installed):
    dists = {"jax": ("0.10.2", ["jaxlib<=0.10.2", 'libtpu==0.0.42.*; extra == "tpu"',
                                'jax-cuda12-plugin; extra == "cuda"', 'pywin32; sys_platform == "win32"']),
             "jaxlib": ("0.10.2", ["numpy>=2"]), "libtpu": ("0.0.42.1", []), "numpy": ("2.4.6", []),
             "absl-py": ("2.5.1", [])}

    def version(self, name):
      if name not in self.dists:
        raise lock.importlib.metadata.PackageNotFoundError(name)
      return self.dists[name][0]

    def requires(self, name):
      return self.dists[name][1]
  text = lock.lock_text(["jax[tpu]>=0.10", "absl-py"], Fake(), python_version="3.11.7")
  assert text.splitlines() == ["# python 3.11.7", "# tokenformer_jax[tpu] dependencies, written by launch.lock",
                               "absl-py==2.5.1", "jax==0.10.2", "jaxlib==0.10.2", "libtpu==0.0.42.1",
                               "numpy==2.4.6"]
  assert lock.pinned(text)["libtpu"] == "0.0.42.1" and lock.python_of(text) == "3.11.7"
  with pytest.raises(ValueError, match="the launching Python lacks gcsfs"):
    lock.lock_text(["jax", "gcsfs"], Fake())
  assert "gcsfs" in lock.package_requirements() and "jax[tpu]>=0.10.2" in lock.package_requirements()


# Logs, preflight ------------------------------------------------------------------------------------------------
def test_logs_follow_prints_what_workers_copied_including_a_preempted_vms_last_copy():
  fake = FakeCloud()
  objects = fake.state["objects"]
  objects["gs://b/logs/s.train.w-0.aaaa.log"] = "step 1\nstep 2\n"     # a VM since preempted: its last copy
  runner = Runner(execute=fake.execute, sleep=fake.sleep, clock=fake.now, say=lambda line: None)
  out, polls = [], []

  def stop():
    polls.append(1)
    objects["gs://b/logs/s.train.w-0.bbbb.log"] = "resumed at step 2\n" * len(polls)
    return len(polls) == 3
  follow_logs(runner, "gs://b/logs", "s.train", follow=True, poll_s=30, stop=stop, out=out.append)
  assert out == ["==> gs://b/logs/s.train.w-0.aaaa.log <==", "step 1\nstep 2",
                 "==> gs://b/logs/s.train.w-0.bbbb.log <==", "resumed at step 2", "resumed at step 2"]
  assert fake.now() == 60


def test_preflight_names_every_problem_before_anything_is_created():
  fake = FakeCloud({"project": "other", "zones": {"us-central2-b": ["v4-8"]}})
  fake.state["objects"]["gs://bkt/t.model"] = "x"
  lines = []
  runner = Runner(execute=fake.execute, sleep=fake.sleep, clock=fake.now, say=lines.append, attempts=1)
  with pytest.raises(LaunchError, match=r"preflight found 3 problems \(listed above\); nothing was created"):
    preflight(runner, [SPEC], "gs://bkt/w", [("tokenizer", "gs://bkt/t.model"), ("TFDS dataset",
                                                                                 "gs://bkt/tfds/openwebtext")])
  assert [line.split(":")[0] + ": " + line.split(": ")[1] for line in lines] == [
      "preflight: project proj does not answer", "preflight: zone us-central2-b does not offer v4-32 to proj",
      "preflight: TFDS dataset gs://bkt/tfds/openwebtext does not exist"]
  assert not fake.calls("create") and "gs://bkt/w/launcher/preflight.txt" not in fake.state["objects"]


# CLIs on PATH ---------------------------------------------------------------------------------------------------
class FakeGcloudOnPath:
  """tests/fake_gcloud.py on PATH as `gcloud`, its state in a JSON file."""

  def __init__(self, tmp_path: pathlib.Path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable = bin_dir / "gcloud"
    executable.write_text(f"#!{sys.executable}\n" + (REPO / "tests" / "fake_gcloud.py").read_text())
    executable.chmod(0o755)
    self.path = tmp_path / "gcloud-state.json"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_STATE", str(self.path))
    self.script({})

  def script(self, scenario, objects=None) -> None:
    cloud = FakeCloud(scenario)
    cloud.state["objects"].update(objects or {})
    self.path.write_text(json.dumps(cloud.state))

  @property
  def cloud(self) -> FakeCloud:
    return FakeCloud(state=json.loads(self.path.read_text()))

  def calls(self):
    return self.cloud.state["calls"]


@pytest.fixture
def fake(tmp_path, monkeypatch):
  return FakeGcloudOnPath(tmp_path, monkeypatch)


@pytest.mark.slow
def test_tpu_cli_lists_its_flags_in_help_and_a_permanent_failure_is_one_line(fake):
  result = run_cli("launch.tpu", "--help")
  ladder = run_cli("launch.ladder", "--help").stdout
  assert "--max_ladder_preemptions" in ladder and "--max_preemptions" in ladder and "keep_on_failure" in ladder
  for flag in ("--max_preemptions", "--max_tpu_hours", "keep_on_failure", "--env", "--valid_until", "--slices",
               "--unknown_timeout_s", "--compilation_cache"):
    assert flag in result.stdout, flag
  fake.script({"zones": {"europe-west4-a": []}})
  result = run_cli("launch.tpu", "status", "--name=tf-test", "--project=proj", "--zone=europe-west4-a",
                   "--accelerator=v4-32")
  assert result.returncode == 0 and result.stdout == "tf-test: absent\n"
  assert fake.calls() == [gcloud.describe_node(gcloud.TpuSpec("tf-test", "europe-west4-a", "proj", "v4-32"))]


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


@pytest.mark.slow
@pytest.mark.parametrize("module, args, phrase", [
    ("launch.tpu", ["up", "--name=tf", "--project=p", "--zone=z", "--accelerator=v4-12", "--workdir=gs://b/x"],
     "unknown accelerator type 'v4-12'"),
    ("launch.tpu", ["up", "--name=tf", "--zone=z", "--accelerator=v4-8"], "needs --project and --zone"),
    ("launch.tpu", ["train", "--name=tf", "--project=p", "--zone=z", "--config=experiments/ladder.py:tiny_0",
                    "--workdir=/tmp/run"], "needs --workdir=gs://"),
    ("launch.tpu", ["up", "--name=tf", "--project=p", "--zone=z", "--workdir=gs://b/x", "--env=1A=b"],
     "--env '1A=b' must be KEY=VALUE"),
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
    ("launch.ladder", PAPER_TPU + ["--slices=2"], "stage paper_124m: --slices=2 needs mesh.data to be a multiple of 2"),
])
def test_bad_flags_fail_before_any_gcloud_call(fake, tmp_path, module, args, phrase):
  (tmp_path / "bad.py").write_text(BAD_LADDER.format(name="bad", accelerator=""))
  (tmp_path / "v4_12.py").write_text(BAD_LADDER.format(name="odd", accelerator=", accelerator='v4-12'"))
  args = [a.format(bad=tmp_path / "bad.py", v4_12=tmp_path / "v4_12.py") for a in args]
  assert_one_error_line(run_cli(module, *args), phrase)
  assert fake.calls() == []


@pytest.mark.slow
def test_a_vision_config_launches_like_any_other_and_its_image_data_are_checked_first(fake):
  from launch.vm import data_urls
  from tokenformer_jax.config import apply_overrides, load_config
  base = ["train", "--name=tf-vit", "--project=p", "--zone=us-central2-b", "--accelerator=v4-32",
          "--config=experiments/vision.py:imagenet_base", "--workdir=gs://b/base"]
  assert_one_error_line(run_cli("launch.tpu", *base), "reads 'tfds:imagenet2012': add --set data.tfds_data_dir=gs://")
  result = run_cli("launch.tpu", *base, "--set=data.tfds_data_dir=gs://b/tfds", "--dry_run")
  assert result.returncode == 0 and fake.calls() == [], result.stderr[-2000:]
  assert ("tokenformer_jax.cli.train --config=experiments/vision.py:imagenet_base --workdir=gs://b/base "
          "--set=data.tfds_data_dir=gs://b/tfds") in result.stdout
  cfg = apply_overrides(load_config("experiments/vision.py:imagenet_base"), ["data.tfds_data_dir=gs://b/tfds"])
  assert data_urls(cfg) == [("TFDS image dataset", "gs://b/tfds/imagenet2012")]   # what preflight lists
  ladder = run_cli("launch.ladder", "--ladder=experiments/vision.py:VISION_LADDER", "--backend=tpu",
                   "--workdir=gs://b/vl", "--project=p", "--zone=us-central2-b", "--set=data.tfds_data_dir=gs://b/tfds",
                   "--dry_run")
  assert ladder.returncode == 0 and fake.calls() == [], ladder.stderr[-2000:]
  steps = 300 * 313   # Base†'s 300 epochs of 313 steps
  assert (f"tokenformer_jax.cli.grow --checkpoint=gs://b/vl/vision_base_matched/{steps} --config=experiments/"
          "vision.py:vision_base --dst=gs://b/vl/vision_base_grown --init=zero_keys") in ladder.stdout
  assert f"# stage vision_base: {100 * 313:,} steps" in ladder.stdout


@pytest.mark.slow
def test_the_paper_ladder_dry_run_prints_every_command_in_order(fake):
  result = run_cli("launch.ladder", *PAPER_TPU, "--provisioning=spot", "--env=LIBTPU_INIT_ARGS=--xla_x=1",
                   "--valid_until=12h", "--dry_run")
  assert result.returncode == 0, result.stderr[-2000:]
  assert fake.calls() == []                                  # printed, not run
  kinds = []
  for line in result.stdout.splitlines():
    if not line.startswith("gcloud "):
      continue
    words = line.split()
    kind = words[2] if words[1] == "storage" else words[4]
    if kind == "ssh":
      kind = next(w for w in ("tokenformer_jax.cli.grow", "tokenformer_jax.cli.train", "tokenformer-setup.sh")
                  if w in line)
    kinds.append(kind)
  first = ["ls", "create", "tokenformer-setup.sh", "tokenformer_jax.cli.train"]
  kept = ["ls", "ls", "tokenformer_jax.cli.grow", "tokenformer_jax.cli.train"]
  fresh = ["ls", "ls", "create", "tokenformer-setup.sh", "tokenformer_jax.cli.grow", "tokenformer_jax.cli.train"]
  assert kinds == first + kept + ["delete"] + fresh + kept + ["delete"]
  out = result.stdout
  assert ("gcloud compute tpus queued-resources create tokenformer-paper-124m --node-id=tokenformer-paper-124m "
          "--zone=us-central2-b --project=proj --accelerator-type=v4-64 --runtime-version=tpu-ubuntu2204-base --spot "
          "--valid-until-duration=12h --metadata-from-file=startup-script=") in out
  assert "export LIBTPU_INIT_ARGS=--xla_x=1; " in out
  assert "export JAX_COMPILATION_CACHE_DIR=gs://bkt/ladder/jax_cache; " in out
  assert ("tokenformer_jax.cli.grow --checkpoint=gs://bkt/ladder/paper_757m/57221 --config=experiments/ladder.py:"
          "paper_1_4b --dst=gs://bkt/ladder/paper_1_4b_grown --init=zero_keys --seed=0 --overwrite") in out
  assert "# stage paper_757m: 57,221 steps × 524,288 tokens (30B) on v4-128, grown from paper_354m (zero_keys)" in out


@pytest.mark.slow
def test_tpu_train_cli_recreates_a_preempted_tpu_and_deletes_it_at_the_end(fake):
  done = checkpoint_url("gs://b/run", 30)
  fake.script({"tick_s": 60, "jobs": {"train": [{"runs_s": 600, "then": "finish", "writes": [done]}]},
               "events": [{"at": 1200, "node": "tf-x", "preempt": True}]}, {"gs://b/run/requirements.lock": LOCK})
  result = run_cli("launch.tpu", "train", "--name=tf-x", "--project=proj", "--zone=us-central2-b",
                   "--accelerator=v4-8", "--provisioning=spot", "--config=experiments/ladder.py:tiny_0",
                   "--workdir=gs://b/run", "--poll_s=0", "--max_preemptions=1", "--env=A=1",
                   "--attempts=1")   # no real waiting: a failed probe is looked at again on the next (0 s) poll
  assert result.returncode == 0, result.stderr[-2000:]
  cloud = fake.cloud
  assert kinds(cloud) == ["create", "setup", "start", "delete", "create", "setup", "start", "delete"]
  assert not cloud.state["nodes"] and not cloud.state["queued"] and not cloud.state.get("refused")
  assert json.loads(cloud.state["objects"]["gs://b/run/launcher/usage.json"])["train"]["preemptions"] == 1
  assert "[tf-x] train is done" in result.stdout and len(cloud.state["calls"]) < 60


@pytest.mark.slow
def test_a_rerun_tpu_ladder_skips_done_stages_and_adopts_a_running_job(fake):
  done = lambda stage, step: checkpoint_url(f"gs://bkt/ladder/{stage}", step)
  objects = {url: "done\n" for url in (done("paper_124m", 572205), done("paper_354m_grown", 0),
                                       done("paper_757m", 57221), done("paper_1_4b", 57221))}
  objects.update({"gs://bkt/ladder/requirements.lock": LOCK, "gs://bkt/neox.model": "x",
                  "gs://bkt/tfds/openwebtext/1.0.0/x.array_record": "x"})
  fake.script({"tick_s": 10}, objects)
  cloud = fake.cloud                       # the 354m job still runs on the kept slice since the last launch
  cloud._new_node("tokenformer-paper-124m", "v4-64", SETUP.script, queued="tokenformer-paper-124m")
  cloud.state["queued"]["tokenformer-paper-124m"] = {"state": "ACTIVE", "nodes": ["tokenformer-paper-124m"]}
  cloud.state["nodes"]["tokenformer-paper-124m"].update(state="READY", health="HEALTHY", jobs={"paper_354m.train": {
      "status": "ALIVE", "start": 0, "runs_s": 60, "then": "finish", "writes": [done("paper_354m", 57221)],
      "log": []}})
  fake.path.write_text(json.dumps(cloud.state))
  result = run_cli("launch.ladder", *PAPER_TPU, "--provisioning=spot", "--poll_s=0", "--nocheck_fit")
  assert result.returncode == 0, result.stderr[-2000:]
  calls = fake.calls()
  assert not [c for c in calls if "create" in c[:6]]                         # nothing created,
  assert not [c for c in calls if any("nohup" in a for a in c)]              # the running job adopted, not restarted
  assert [c[5] for c in calls if "delete" in c[:6]] == ["tokenformer-paper-124m", "tokenformer-paper-757m"]
  assert "gs://bkt/ladder/launcher/preflight.txt" not in fake.cloud.state["objects"]
  assert any(u.startswith("gs://bkt/ladder/code/src-") for u in fake.cloud.state["objects"])
  assert "# ladder done: gs://bkt/ladder/paper_1_4b/checkpoints/57221" in result.stdout
  assert "kept for paper_354m (same slice)" in result.stdout


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


@pytest.mark.slow
def test_the_local_ladder_dry_run(tmp_path):
  result = run_cli("launch.ladder", "--ladder=tiny", "--backend=local", f"--workdir={tmp_path}", "--dry_run")
  assert result.returncode == 0, result.stderr[-2000:]
  commands = [line for line in result.stdout.splitlines() if line.startswith("python ")]
  assert commands == [
      f"python -m tokenformer_jax.cli.train --config=experiments/ladder.py:tiny_0 --workdir={tmp_path}/tiny_0",
      f"python -m tokenformer_jax.cli.grow --checkpoint={tmp_path}/tiny_0/30 --config=experiments/ladder.py:tiny_1 "
      f"--dst={tmp_path}/tiny_1_grown --init=zero_keys --seed=0 --overwrite",
      f"python -m tokenformer_jax.cli.train --config=experiments/ladder.py:tiny_1 --workdir={tmp_path}/tiny_1 "
      f"--init_from={tmp_path}/tiny_1_grown",
      f"python -m tokenformer_jax.cli.grow --checkpoint={tmp_path}/tiny_1/20 --config=experiments/ladder.py:tiny_2 "
      f"--dst={tmp_path}/tiny_2_grown --init=zero_keys --seed=0 --overwrite",
      f"python -m tokenformer_jax.cli.train --config=experiments/ladder.py:tiny_2 --workdir={tmp_path}/tiny_2 "
      f"--init_from={tmp_path}/tiny_2_grown",
  ]
  assert not any(tmp_path.iterdir())


def metrics(run_dir):
  return [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
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
  shutil.copytree(whole / "tiny_0", killed / "tiny_0")   # (its finished first stage: not trained a second time)
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
  for a, b in zip(jax.tree.leaves(run_params(whole / "tiny_2", tiny[2].config.model)),
                  jax.tree.leaves(run_params(killed / "tiny_2", tiny[2].config.model)), strict=True):
    np.testing.assert_array_equal(a, b)
  losses = lambda run: {m["step"]: m["train/loss"] for m in metrics(run) if "train/loss" in m}
  assert losses(whole / "tiny_2") == losses(killed / "tiny_2")


def test_no_v4_64_for_longer_than_the_fallback_wait_continues_the_run_on_a_v4_32_and_the_ledger_says_so():
  from launch.tpu import ledger_budgets
  v4_64 = gcloud.TpuSpec("tf-test", "us-central2-b", "proj", "v4-64", provisioning="spot", queued=True)
  scenario = {"jobs": finishes(3000), "events": [{"at": 1000, "node": "tf-test", "preempt": True}],
              "sold_out": {"v4-64": 1000}}   # preempted at 1000 s, and no v4-64 from then on
  fake, lines = FakeCloud(scenario), []
  runner = Runner(execute=fake.execute, sleep=fake.sleep, clock=fake.now, say=lines.append)
  budgets, ladder, save = ledger_budgets(runner, "gs://b/w", ["s"], None, None)
  limits = Limits(poll_s=60, fallback_after_s=1800, fallback_slices=("v4-32", "v4-128"), prefer_original=True)
  vm = TpuVm(v4_64, runner, setup=SETUP, limits=limits)
  vm.ledger = save
  vm.run_job(Job("s.train", TRAIN, lambda: committed(runner, DONE_URL)), [budgets["s"], ladder])
  assert kinds(fake) == ["create", "setup", "start", "delete", "create", "delete", "create", "setup", "start"]
  creates = [next(a for a in c if a.startswith("--accelerator-type=")) for c in fake.calls("create")]
  assert creates == ["--accelerator-type=v4-64"] * 2 + ["--accelerator-type=v4-32"]
  fallback = next(line for line in lines if "continuing the run on a v4-32" in line)
  assert fallback.startswith("[tf-test] no v4-64 for 30 min (WAITING_FOR_RESOURCES)") and "last checkpoint" in fallback
  starts = [job["command"] for job in fake.state["nodes"]["tf-test"]["jobs"].values()]
  assert len(starts) == 1 and " ".join(TRAIN) in starts[0]   # the same command (and global batch) on the v4-32
  usage = json.loads(fake.state["objects"]["gs://b/w/launcher/usage.json"])
  assert usage["s"]["preemptions"] == 1 and usage["s"]["slices"] == [
      {"accelerator": "v4-32", "instead_of": "v4-64", "why": "no v4-64 for 30 min (WAITING_FOR_RESOURCES)"}]
  assert lines[-1] == "[tf-test] s.train is done" and vm.spec.accelerator == "v4-32"
  # --prefer_original: the next restart (a preemption of the v4-32) asks for the v4-64 again.
  fake.scenario["sold_out"] = {}
  fake.scenario["jobs"] = finishes(10**5)
  fake.scenario["events"].append({"at": fake.now() + 600, "node": "tf-test", "preempt": True})
  done_at = fake.now() + 3000
  vm.run_job(Job("s.train", TRAIN, lambda: fake.now() > done_at), [budgets["s"], ladder])
  assert vm.spec.accelerator == "v4-64" and any("asking for the original v4-64 again" in line for line in lines)
  assert json.loads(fake.state["objects"]["gs://b/w/launcher/usage.json"])["s"]["slices"][-1]["accelerator"] == "v4-64"
  # Before anything is created, the ladder checks (and plans) each stage on each fallback size as the trainer will
  # run it there: the same global batch of 512, grad_accum 2 on a v4-32 where the v4-64 needed 1.
  _, stages = load_stages("paper", ["data.tfds_data_dir=gs://b/t", "data.tokenizer=gs://b/t.model"])
  fallen = {(s.name, s.accelerator): s.config for s in fallback_stages(stages, ("v4-32", "v4-128"))}
  assert fallen["paper_124m", "v4-32"].grad_accum == 2 and fallen["paper_124m", "v4-32"].global_batch == 512
  assert fallen["paper_124m", "v4-128"].grad_accum == 1 and ("paper_757m", "v4-128") not in fallen
