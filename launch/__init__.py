"""Launch TokenFormer training on TPU v4 slices with gcloud, and run the growth ladder (on TPUs or locally).

  gcloud.py    every gcloud command line the launcher issues, built by pure functions (tested exactly)
  worker.py    what runs on the workers: the setup (startup-script: uv's Python + the lock file), start, alive
  lock.py      the lock file: exact versions of the trainer's dependency closure, recorded when a ladder starts
  faults.py    every TPU / queued-resource state and health value → a decision; preemption and TPU-hour budgets
  runner.py    runs commands: retries with backoff on transient failures, one clear line on permanent ones
  vm.py        one TPU slice's life: preflight, create, set up, start, the watch (recreate / restart / wait), delete
  tpu.py       `python -m launch.tpu`: the TPU flags and the single-job command over vm.py
  ladder.py    the ladder: skip done stages, grow from the previous one, train; idempotent
"""
from tokenformer_jax import accelerators  # noqa: E402  (before any launch module imports JAX)

accelerators.skip_absent_tpu()   # a controller (launch.ladder's fit check compiles in a child) has no TPU
