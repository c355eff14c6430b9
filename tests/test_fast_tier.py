"""The host-local fast tier (checkpoint_local.py) on real jobs of 4 processes (launch.local), 1 device each, under
the fsdp preset, so that each host holds and saves its own quarter of every sharded array.

One run (helpers.JOB_RUN, 8 steps) saves persistently every 3 steps and locally every step (keeping 3), and is
killed without notice: SIGKILL to process 2 at its 6th step, once the persistent step 3 and every host's local
step 5 are complete. Its directories are then put back as they were before each restart, and changed:

  nothing changed                       → local step 5 (nothing lost)
  host 3's local directory deleted      → persistent step 3 (a replaced VM)
  a flipped byte in a file of host 1's 5 → local step 4 (host 1 no longer offers 5)
  hosts 2 and 3 without their step 5    → local step 4 (their freshest steps differ from hosts 0 and 1's)

Every restart then trains to step 8, and must compute, bitwise, the losses the killed job computed and one
another's, and end in the same state. A mix of two steps, which no kill makes, is forged in this process and
refused (the last test).
"""
from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from helpers import FSDP, JOB_RUN, exit_codes, launch_local, losses
from tokenformer_jax.checkpoint import RunCheckpoints
from tokenformer_jax.checkpoint_local import LocalTier, agreed_step
from tokenformer_jax.goodput import of_events
from tokenformer_jax.train.events import read_events


FLAGS = (*JOB_RUN, *FSDP, "--set=checkpoint_every=3", "--set=local_checkpoint_every=1",
         "--set=keep_local_checkpoints=3")


def job(root: pathlib.Path, fault: tuple[str, str] = ("none", "0"), env: dict | None = None):
  return launch_local(4, 1, "tests/train_with_fault.py", *fault, *FLAGS,
                      f"--set=local_checkpoint_dir={root / 'local'}", f"--workdir={root / 'run'}", env=env)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
  """(the directory holding run/ and local/ as the kill left them, the killed job's result)."""
  root = tmp_path_factory.mktemp("fast_tier")
  after = [root / "run" / "checkpoints" / "3",
           *(root / "local" / f"host_{h}" / "5" / "manifest.json" for h in range(4))]
  result = job(root, ("SIGKILL", "6"), env={"FAULT_PROCESS": "2", "FAULT_AFTER": ":".join(map(str, after))})
  return root, result


def restart(killed, tmp_path, change=lambda local: None):
  """The killed run's directories, as the kill left them, changed by `change(local root)` and resumed to step 8:
  (the job's result, the run directory). The manifests name the run directory, so the copies keep its path."""
  root, _ = killed
  for name in ("run", "local"):
    shutil.copytree(root / name, tmp_path / name)
  change(tmp_path / "local")
  for name in ("run", "local"):   # the saved run moves aside, the copy takes its place (and back, after)
    (root / name).rename(root / f"{name}.saved")
    (tmp_path / name).rename(root / name)
  try:
    result = job(root)
    shutil.copytree(root / "run", tmp_path / "resumed")
  finally:
    for name in ("run", "local"):
      shutil.rmtree(root / name)
      (root / f"{name}.saved").rename(root / name)
  return result, tmp_path / "resumed"


def in_flight(killed) -> int:
  """1 if the killed job's event log holds step 6 — process 0 computed it until the collective with the killed
  process 2 failed, when that came before the launcher's kill — else 0: a lost computation either way the
  restarts must count."""
  return int(any(e["kind"] == "step" and e["step"] == 6 for e in read_events(killed[0] / "run")))


def final_checksums(workdir) -> dict:
  return RunCheckpoints(workdir, read_only=True).read_json(8, "checksums")


@pytest.fixture(scope="module")
def untouched(killed, tmp_path_factory):
  """(result, run directory) of the restart from the directories as the kill left them."""
  return restart(killed, tmp_path_factory.mktemp("untouched"))


def flip_a_byte(step_dir: pathlib.Path) -> None:
  """Flip a byte in the middle of the step's biggest shard file."""
  biggest = max(step_dir.glob("*.npy"), key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0x01
  biggest.write_bytes(bytes(data))


@pytest.mark.slow
def test_the_kill_leaves_each_host_its_own_shards_and_the_persistent_step_3(killed):
  root, result = killed
  assert exit_codes(result)[2] == 137, result.stdout[-3000:]
  assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
  assert sorted(p.name for p in (root / "local").iterdir()) == [f"host_{h}" for h in range(4)]
  for h in range(4):   # every step but the persistent one, the newest 3 (and step 1 where the kill landed between
    # the commit of step 5 and the removal of the oldest, which comes after it)
    held = sorted(int(p.name) for p in (root / "local" / f"host_{h}").iterdir())
    assert held in ([2, 4, 5], [1, 2, 4, 5]), (h, held)
  manifests = [json.loads((root / "local" / f"host_{h}" / "5" / "manifest.json").read_text()) for h in range(4)]
  embedding = [next(leaf for leaf in m["leaves"] if leaf["path"] == "['params']['embedding']")
               for m in manifests]
  assert all(len(leaf["shards"]) == 1 for leaf in embedding)
  pieces = sorted(tuple(leaf["shards"][0]["index"][0]) for leaf in embedding)   # its rows on each host
  vocab = embedding[0]["shape"][0]
  assert [p[0] for p in pieces] == [h * vocab // 4 for h in range(4)]   # four quarters that tile the rows
  assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:])) and pieces[-1][1] == vocab
  assert all(m["checksums"] == manifests[0]["checksums"] for m in manifests)   # one record of the whole state


@pytest.mark.slow
def test_a_restart_takes_the_newest_local_step_every_host_holds(killed, untouched):
  result, resumed = untouched
  assert result.returncode == 0, result.stdout[-3000:]
  assert "at step 5 from the host-local checkpoints" in result.stdout
  assert "each host's newest whole step: 5, 5, 5, 5; the newest persistent one: 3" in result.stdout
  restart_event = next(e for e in read_events(resumed) if e["kind"] == "restart")
  assert (restart_event["step"], restart_event["tier"]) == (5, "local")
  assert of_events(read_events(resumed)).lost_steps == in_flight(killed)
  killed_losses = losses(killed[0] / "run")
  assert sorted(killed_losses) == [1, 2, 3, 4, 5]
  assert {s: v for s, v in losses(resumed).items() if s <= 5} == killed_losses


@pytest.mark.slow
@pytest.mark.parametrize("case, change, expected", [
    ("replaced VM", lambda local: shutil.rmtree(local / "host_3"),
     "host-local checkpoints not used (each host's newest whole step: 5, 5, 5, none; the newest persistent one: 3)"),
    ("flipped byte", lambda local: flip_a_byte(local / "host_1" / "5"),
     "at step 4 from the host-local checkpoints"),
    ("freshest steps differ", lambda local: [shutil.rmtree(local / f"host_{h}" / "5") for h in (2, 3)],
     "each host's newest whole step: 5, 5, 4, 4; the newest persistent one: 3"),
])
def test_a_restart_falls_back_past_what_a_host_lacks_to_the_same_run(killed, untouched, tmp_path, case, change,
                                                                     expected):
  result, resumed = restart(killed, tmp_path, change)
  assert result.returncode == 0, result.stdout[-3000:]
  assert expected in result.stdout, result.stdout[-3000:]
  restored = 3 if case == "replaced VM" else 4
  restart_event = next(e for e in read_events(resumed) if e["kind"] == "restart")
  assert (restart_event["step"], restart_event.get("tier", "persistent")) == (
      restored, "persistent" if case == "replaced VM" else "local")
  assert of_events(read_events(resumed)).lost_steps == 5 - restored + in_flight(killed)   # computed again
  # Every step's loss and the final state, bitwise, as the restart from local step 5 computed them: the restored
  # state is step `restored` exactly, and no piece of another step.
  assert losses(resumed) == losses(untouched[1])
  assert sorted(losses(resumed)) == list(range(1, 9))
  assert final_checksums(resumed) == final_checksums(untouched[1])


def test_pieces_of_two_steps_never_restore_and_the_choice_of_step(tmp_path):
  """A host's step 2 with one shard file taken from its step 1 (its SHA-256 in the manifest made to match, so
  only the checksums of the whole state can tell): refused; step 1 itself restores exactly. And which step a job
  takes from what each host offers."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("fsdp",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  abstract = {"params": {"w": jax.ShapeDtypeStruct((8, 3), np.float32, sharding=sharded)}}
  tier = LocalTier(str(tmp_path / "local"), tmp_path / "run", every=1, keep=3)
  states = {}
  for step in (1, 2):
    states[step] = {"params": {"w": jax.device_put(np.arange(24, dtype=np.float32).reshape(8, 3) * step, sharded)}}
    tier.save(step, states[step], config={}, data_position={"position": step})
  tier.wait()
  assert tier.offers(abstract) == [2, 1]
  state, position, _ = tier.restore(1, abstract)
  np.testing.assert_array_equal(state["params"]["w"], states[1]["params"]["w"])
  assert position == {"position": 1} and state["params"]["w"].sharding == sharded
  two = pathlib.Path(tier.directory) / "2"
  manifest = json.loads((two / "manifest.json").read_text())
  shard = manifest["leaves"][0]["shards"][1]
  shutil.copy(pathlib.Path(tier.directory) / "1" / shard["file"], two / shard["file"])
  shard["sha256"] = json.loads((pathlib.Path(tier.directory) / "1" / "manifest.json").read_text()
                               )["leaves"][0]["shards"][1]["sha256"]
  (two / "manifest.json").write_text(json.dumps(manifest))
  assert tier.offers(abstract) == [2, 1]   # every file is whole: only the state's checksums can tell
  assert tier.restore(2, abstract) is None
  flip_a_byte(pathlib.Path(tier.directory) / "1")
  assert tier.offers(abstract) == [2]   # a flipped byte: the step is not offered
  replicated = {"params": {"w": jax.ShapeDtypeStruct((8, 3), np.float32, sharding=jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",)), jax.sharding.PartitionSpec()))}}
  assert tier.offers(replicated) == []   # another layout asks for pieces no step holds
  assert agreed_step([[5, 4], [5, 4], [4, 2], [4]], persistent=3) == 4
  assert agreed_step([[5, 4], []], persistent=3) is None   # a host with nothing: the persistent tier
  assert agreed_step([[2], [2]], persistent=3) is None     # older than the persistent one
  assert agreed_step([[3], [3]], persistent=3) == 3        # as new: the local copy, faster to read
  assert agreed_step([[3], [3]], persistent=None) == 3
