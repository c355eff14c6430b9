"""One of two processes (2 CPU devices each, one 4-device mesh) saving or restoring a run's checkpoints.

  python tests/two_process_checkpoint.py save|restore PROCESS_ID PORT RUN_DIR

`save` writes steps 1 and 2 of a [512, 64] array sharded over all 4 devices (each process writes its rows);
`restore` takes the newest good checkpoint and prints, as JSON, the step and which step's values it holds.
The values are random 32-bit words: incompressible, so a flipped byte in a data file reads back as wrong values
rather than as a decoding error on the one host that reads it (which would leave that host out of Orbax's
collective barriers: see README, "Checkpoints that cannot lie").
"""
import json
import os
import pathlib
import sys

mode, process_id, port, run_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], pathlib.Path(sys.argv[4])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from tokenformer_jax.checkpoint import RunCheckpoints, checksums  # noqa: E402

logging.set_verbosity(logging.ERROR)
rows = NamedSharding(Mesh(np.array(jax.devices()), ("fsdp",)), PartitionSpec("fsdp", None))
values = np.random.default_rng(0).integers(0, 2**32, (512, 64), dtype=np.uint32)
at_step = lambda step: jax.make_array_from_callback(values.shape, rows, lambda index: values[index] + np.uint32(step))
abstract = jax.ShapeDtypeStruct(values.shape, np.uint32, sharding=rows)
checkpoints = RunCheckpoints(run_dir, keep=3)
if mode == "save":
  for step in (1, 2):
    checkpoints.save(step, params={"w": at_step(step)}, opt_state={"m": at_step(10 * step)}, config={})
  checkpoints.wait()
  print(json.dumps({"checksum": checksums({"w": at_step(2)})["['w']"]}), flush=True)
else:
  step, params, _ = checkpoints.restore_newest({"w": abstract}, {"m": abstract})
  gathered = np.asarray(multihost_utils.process_allgather(params["w"], tiled=True))
  holds = [s for s in (1, 2) if np.array_equal(gathered, values + np.uint32(s))]
  print(json.dumps({"step": step, "holds": holds}), flush=True)
checkpoints.close()
