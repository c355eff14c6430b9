"""What runs on the TPU workers: the setup (the VMs' startup-script), starting a job, and asking after it.

Every script is the same string on every worker; a worker's own identity only enters through `$(hostname)`.

Setup, at every boot (the startup-script metadata) and again over ssh before a job starts (same script, under a
lock, a no-op when done): install the launcher's Python and the exact versions of the lock file into a venv, then
unpack the code. The Python comes from uv (`pip install uv==UV_VERSION` with the image's own python3, then
`uv python install X.Y.Z`): the TPU image `tpu-ubuntu2204-base` ships Python 3.10, the package needs 3.11, and uv
installs the launcher's exact patch release as a relocatable standalone build, with no PPA, apt lock or
compilation. `uv pip sync` installs exactly the lock's lines and removes anything else.
"""
from __future__ import annotations

import hashlib
import shlex

UV_VERSION = "0.13.8"
ROOT = "/opt/tokenformer"                 # code, venv, Python and setup log on every worker (root-owned)
LOGS = "$HOME/tokenformer-logs"           # the jobs' logs and pid files (the ssh user's)
SETUP_DONE = "tokenformer setup done"     # what a worker prints when it is set up


def setup_key(archive_url: str, lock_text: str, python_version: str) -> str:
  return hashlib.sha256(f"{archive_url}\n{python_version}\n{UV_VERSION}\n{lock_text}".encode()).hexdigest()[:16]


def setup_script(archive_url: str, lock_text: str, python_version: str) -> str:
  """The startup-script: a bash script that sets a worker up for `archive_url` (the code on gs://) and the lock.

  Idempotent (a key of what it installed in ROOT/setup.done) and serialised by flock, so the boot run and an ssh
  run never overlap. $TOKENFORMER_ROOT overrides ROOT (tests run it in a temporary folder).
  """
  key = setup_key(archive_url, lock_text, python_version)
  lock_lines = " ".join(shlex.quote(line) for line in lock_text.splitlines())
  uv = f'"$ROOT/tools/uv-{UV_VERSION}/bin/uv"'
  steps = [
      'rm -f "$ROOT/setup.done"',
      f"printf '%s\\n' {lock_lines} > \"$ROOT/requirements.lock\"",
      f'{{ [ -x {uv} ] || python3 -m pip install --quiet --target "$ROOT/tools/uv-{UV_VERSION}" uv=={UV_VERSION}; }}',
      f"{uv} python install {python_version}",
      'rm -rf "$ROOT/venv"',
      f'{uv} venv --python {python_version} "$ROOT/venv"',
      f'{uv} pip sync --python "$ROOT/venv/bin/python" "$ROOT/requirements.lock"',
      f'gcloud storage cp {shlex.quote(archive_url)} "$ROOT/src.tar.gz"',
      'rm -rf "$ROOT/src" && mkdir -p "$ROOT/src" && tar -xzf "$ROOT/src.tar.gz" -C "$ROOT/src"',
  ]
  body = " &&\n  ".join(steps)
  return f"""#!/bin/bash
# tokenformer_jax worker setup {key}: Python {python_version} (uv {UV_VERSION}), the lock file, the code.
export PATH="$PATH:/snap/bin:/usr/local/bin"
ROOT="${{TOKENFORMER_ROOT:-{ROOT}}}"
export UV_PYTHON_INSTALL_DIR="$ROOT/python" UV_CACHE_DIR="$ROOT/uv-cache"
mkdir -p "$ROOT" && exec 9>"$ROOT/setup.lock" && flock 9 || exit 1
if [ "$(cat "$ROOT/setup.done" 2>/dev/null)" = "{key}" ]; then echo "{SETUP_DONE} on $(hostname)"; exit 0; fi
if ! (
  {body}
) > "$ROOT/setup.log" 2>&1; then
  echo "tokenformer setup FAILED on $(hostname): $(tail -n 1 "$ROOT/setup.log")"; exit 1
fi
echo "{key}" > "$ROOT/setup.done" && echo "{SETUP_DONE} on $(hostname)"
"""


def run_setup(script: str) -> str:
  """The ssh command that runs the setup script as root (the same script the VM runs at boot)."""
  encoded = __import__("base64").b64encode(script.encode()).decode()
  return (f"echo {encoded} | base64 -d > /tmp/tokenformer-setup.sh && "
          "sudo bash /tmp/tokenformer-setup.sh")


def _python(argv: list[str]) -> str:
  """argv → shell words, `python` meaning the venv's."""
  words = [f"{ROOT}/venv/bin/python" if argv[0] == "python" else shlex.quote(argv[0])]
  return " ".join(words + [shlex.quote(a) for a in argv[1:]])


def stop_script(job: str, wait_s: int = 60) -> str:
  """Stop what is left of an earlier run of `job` on this worker (a restart after one worker died leaves the others
  hanging on their peers): SIGTERM, up to `wait_s` seconds to exit, then SIGKILL."""
  pid = f"{LOGS}/{job}.pid"
  return (f'P=$(cat {pid} 2>/dev/null); if [ -n "$P" ] && kill -0 "$P" 2>/dev/null; then kill "$P"; '
          f'for i in $(seq {wait_s}); do kill -0 "$P" 2>/dev/null || break; sleep 1; done; kill -9 "$P" 2>/dev/null; '
          "fi")


def start_script(job: str, argv: list[str], env: dict[str, str] | None = None, logs_url: str | None = None,
                 sync_s: int = 60) -> str:
  """Stop a leftover run, then start argv detached (it outlives the ssh session) with `env`, appending to
  LOGS/<job>.<host>.log, its pid in LOGS/<job>.pid. With `logs_url` (gs://), a detached loop copies the log there
  every `sync_s` seconds while the job runs, and once more when it ends, as <job>.<host>.<boot>.log: a VM
  preempted later has left its last copy."""
  log = f"{LOGS}/{job}.$(hostname).log"
  exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in sorted((env or {}).items()))
  # `;`, not `&&`, before the `&`: then `$!` is the job's own pid (an and-list would background a subshell)
  start = (f"{stop_script(job)}; mkdir -p {LOGS}; cd {ROOT}/src || exit 1; {exports}export PYTHONPATH={ROOT}/src; "
           f"nohup {_python(argv)} >> {log} 2>&1 < /dev/null & echo $! > {LOGS}/{job}.pid")
  if not logs_url:
    return start
  copy = 'gcloud storage cp "$LOG" "$URL" > /dev/null 2>&1'
  loop = f'while kill -0 "$PID" 2>/dev/null; do {copy}; sleep {sync_s}; done; {copy}'
  target = f"{logs_url.rstrip('/')}/{job}.$(hostname).$(cut -c1-8 /proc/sys/kernel/random/boot_id).log"
  return (f"{start}; LOG={log} URL={target} PID=$(cat {LOGS}/{job}.pid) "
          f"setsid nohup bash -c {shlex.quote(loop)} > /dev/null 2>&1 < /dev/null &")


def alive_script(job: str) -> str:
  """Prints `<job> ALIVE on <host>` or `<job> DEAD on <host>` on each worker (and always exits 0)."""
  return (f'if kill -0 "$(cat {LOGS}/{job}.pid 2>/dev/null)" 2>/dev/null; then echo "{job} ALIVE on $(hostname)"; '
          f'else echo "{job} DEAD on $(hostname)"; fi')


def tail_script(job: str, lines: int = 20) -> str:
  return f"tail -n {lines} {LOGS}/{job}.*.log"
