"""Run command lines: retry transient failures with exponential backoff, stop on permanent ones with one line."""
from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence


class LaunchError(RuntimeError):
  """A launch step that cannot go on; the message is one line saying what failed and why."""


# Failures worth retrying: the service is briefly unavailable or busy, rate limits, a fresh VM's sshd or apt not
# ready yet, or no capacity right now. Quota is not transient: waiting does not raise it.
TRANSIENT = re.compile(
    r"UNAVAILABLE|Internal error|INTERNAL|try again|Rate Limit|rate limit|RESOURCE_EXHAUSTED|DEADLINE_EXCEEDED|"
    r"\b50[234]\b|Connection (closed|reset|refused|timed out)|ssh: connect to host|Could not get lock|"
    r"no more capacity|currently unavailable")
NOT_TRANSIENT = re.compile(r"[Qq]uota")
# No capacity for a TPU created directly: the TPU code waits and tries again (within --ready_timeout_s) instead of
# the runner's few minutes of backoff.
NO_CAPACITY = ("no more capacity", "There is no more capacity", "currently unavailable", "ZONE_RESOURCE_POOL_EXHAUSTED",
               "Insufficient capacity")
# A fresh VM's ssh keys are still propagating: transient right after creation only.
PUBLICKEY = re.compile(r"Permission denied \(publickey")


def is_transient(output: str, also: re.Pattern | None = None) -> bool:
  return bool(TRANSIENT.search(output) or (also and also.search(output))) and not NOT_TRANSIENT.search(output)


def reason(output: str) -> str:
  """The line that explains a failure: gcloud's last `ERROR:` line, else the last non-empty line."""
  lines = [line.strip() for line in output.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("ERROR:")]
  return (errors or lines or ["no output"])[-1]


def display(argv: Sequence[str]) -> str:
  """argv as a shell line, quoting `--flag=value` as `--flag='value'` so it reads like the docs."""
  def word(arg: str) -> str:
    flag, eq, value = arg.partition("=")
    if arg.startswith("--") and eq and shlex.quote(value) != value:
      return f"{flag}={shlex.quote(value)}"
    return shlex.quote(arg)
  return " ".join(word(a) for a in argv)


def short(argv: Sequence[str]) -> str:
  """`gcloud compute tpus tpu-vm create NAME --zone=...` → `gcloud compute tpus tpu-vm create NAME`."""
  return " ".join(a for a in argv if not a.startswith("-"))[:120]


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str


def execute(argv: Sequence[str]) -> Result:
  """Run argv as a subprocess (no stdin), capturing its output."""
  try:
    done = subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL)
  except FileNotFoundError:
    raise LaunchError(f"{argv[0]} is not on PATH; install the Google Cloud CLI (https://cloud.google.com/sdk) "
                      "and run `gcloud auth login`") from None
  return Result(done.returncode, done.stdout, done.stderr)


class Runner:
  """Executes argv lists. `dry_run` prints them instead; `sleep`, `clock` and `execute` are injectable so tests
  neither wait nor need gcloud."""

  def __init__(self, *, attempts: int = 6, backoff_s: float = 10.0, max_backoff_s: float = 300.0,
               dry_run: bool = False, sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.time,
               say: Callable[[str], None] = lambda line: print(line, flush=True),
               execute: Callable[[Sequence[str]], Result] = execute):
    self.attempts, self.backoff_s, self.max_backoff_s = attempts, backoff_s, max_backoff_s
    self.dry_run, self.sleep, self.clock, self.say, self.execute = dry_run, sleep, clock, say, execute

  def run(self, argv: Sequence[str], *, expect: Sequence[str] = (), quiet: bool = False,
          also_transient: re.Pattern | None = None, attempts: int | None = None) -> Result:
    """Run argv until it succeeds, or fails with stderr containing one of `expect` (an answer such as
    NOT_FOUND, returned to the caller); raise LaunchError on a permanent failure or after the last attempt.
    `also_transient` adds failures worth retrying for this call (e.g. PUBLICKEY right after creation);
    `attempts` lowers the number of tries for a call whose caller looks again anyway (a probe)."""
    attempts = min(attempts or self.attempts, self.attempts)
    if self.dry_run:
      self.say(display(argv))
      return Result(0, "", "")
    if not quiet:
      self.say(f"$ {display(argv)}")
    for attempt in range(1, attempts + 1):
      done = self.execute(argv)
      if done.returncode == 0 or any(e in done.stderr for e in expect):
        return done
      output = done.stderr + "\n" + done.stdout
      why = reason(done.stderr) if done.stderr.strip() else reason(done.stdout)
      if not is_transient(output, also_transient):
        raise LaunchError(f"`{short(argv)}` failed (exit {done.returncode}): {why}")
      if attempt == attempts:
        raise LaunchError(f"`{short(argv)}` still failing after {attempt} attempts (exit {done.returncode}): {why}")
      delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
      self.say(f"transient failure of `{short(argv)}`: {why}; retry {attempt}/{attempts - 1} in {delay:.0f}s")
      self.sleep(delay)
    raise AssertionError("unreachable")
