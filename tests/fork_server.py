"""The test suite's command runner: one process per pytest worker that has imported jax, flax, Orbax and grain once
(tokenformer_jax.cli.tools.preload) and runs each `python -m MODULE ARGS` / `python SCRIPT ARGS` that
helpers.run_cli asks for in a child forked from it (tools.run_main): the 2-3 s of imports a real process start
costs are paid once, not by each of the suite's CLI runs.

Requests and replies are JSON lines on stdin / the original stdout: {"target", "args", "env" (the child's whole
environment), "timeout"} → {"rc", "stdout", "stderr"}. Only environments that agree with this process's on every
JAX_* variable are sent here (jax reads those when it is imported); helpers.run_cli starts a real process for the
others.
"""
import json
import os
import sys

sys.path[0] = os.getcwd()   # the repository root (as `python -m` has it), not tests/
from tokenformer_jax.cli import tools  # noqa: E402

tools.preload()
replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)   # whatever the imports print goes to stderr, never into a reply
for line in sys.stdin:
  request = json.loads(line)
  env = request["env"]

  def child(data_path, request=request, env=env):
    os.environ.clear()
    os.environ.update(env)
    # pylint: disable-next=protected-access  (the runner's own child, in its "run" mode)
    return tools._child(request["target"], request["args"], "run", {}, None, data_path)

  outcome = tools.in_child(child, timeout=request["timeout"], separate_stderr=True)
  replies.write(json.dumps({"rc": outcome.rc, "stdout": outcome.output, "stderr": outcome.stderr,
                            "timed_out": outcome.timed_out}) + "\n")
  replies.flush()
