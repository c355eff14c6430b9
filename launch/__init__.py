"""Launch TokenFormer training on TPU v4 slices with gcloud, and run the growth ladder (on TPUs or locally).

  gcloud.py    every gcloud command line the launcher issues, built by pure functions (tested exactly)
  runner.py    runs them: retries with backoff on transient failures, one clear line on permanent ones
  tpu.py       one TPU VM's life: create, wait, copy code, set up, start, watch (recreate on preemption), delete
  ladder.py    the ladder: skip done stages, grow from the previous one, train; idempotent
"""
