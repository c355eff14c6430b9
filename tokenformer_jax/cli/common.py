"""What every command-line tool shares: process setup, errors printed as one line, a quiet console (library log
lines to a file, see `quiet_console`), and `command`, the shell around a main that puts them together. It defines
no flags, so that any main can use it (the launchers and the data tools too); the shared flags are in
config_flags.py (--config, --set, --seed) and checkpoint_flags.py (a run or one of its checkpoints)."""
from __future__ import annotations

import functools
import os
import sys
import tempfile

from absl import flags


def setup_process() -> None:
  """Join the job's other processes (TPU workers, or launch.local's processes) before touching a device. Every
  main that runs on all workers of a slice (train, grow, eval) calls it first."""
  from tokenformer_jax import sharding
  sharding.initialize_distributed()


def one_line_errors(*error_types):
  """Wrap a main so that the expected errors end the process with one clear line and exit code 1."""
  def decorate(main):
    @functools.wraps(main)
    def wrapped(argv):
      try:
        return main(argv)
      except error_types as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    return wrapped
  return decorate


def verbosity_requested() -> bool:
  """Whether absl's --verbosity (or --v) was given: then library lines stay on stderr, at that level."""
  return any(name in flags.FLAGS and flags.FLAGS[name].present for name in ("verbosity", "v"))


def quiet_console(log_dir=None, name: str | None = None, *, shown: bool | None = None) -> str | None:
  """Keep library log lines (absl, Orbax, JAX INFO and Python warnings) off the console: they are held in memory
  and go to LOG_DIR/NAME.log once `log_dir` is given here or later (`train.logger.attach_library_log`; the
  trainer does it in WORKDIR/logs). absl's --verbosity (or --v) given on the command line leaves them on stderr
  (`shown` decides instead, for a main whose command line is not absl's). Returns the log file, if attached.
  """
  from tokenformer_jax.train import logger   # pylint: disable=g-import-not-at-top (keeps this module light)
  if verbosity_requested() if shown is None else shown:
    return None
  logger.capture_library_logs()
  return None if log_dir is None else logger.attach_library_log(log_dir, name)


# Where the library lines of a tool that writes no run go (one file per tool, appended to; each process's lines
# start with a line naming its command).
TEMP_LOGS = os.path.join(tempfile.gettempdir(), "tokenformer_jax", "logs")


def say_library_log(path: str | None, shown_by: str = "--verbosity=0") -> None:
  """Say where the library lines go, in one line on stderr, when the first one does (see quiet_console)."""
  from tokenformer_jax.train import logger   # pylint: disable=g-import-not-at-top
  if path:
    logger.say_with_first_library_line(f"library log lines go to {path} ({shown_by} shows them here instead)")


SET_HINT = "fields are set with --set field=value"


def command(*error_types, log: str | None = None, arguments: bool = False, distributed: bool = False,
            hint: str = ""):
  """The shell of a main: `@command(CheckpointError, log="eval")` above `def main(argv)`, run by `app.run(main)`.

  Arguments after the flags are refused (the message ending with `hint`) unless the main takes them (`arguments`);
  `distributed` joins the job's other processes first (`setup_process`); library log lines go to TEMP_LOGS/LOG.log,
  said in one line on
  stderr when the first one comes (with `log=None` they are held until the main names its run's log directory,
  `quiet_console(DIR, NAME)`); ValueError, FileNotFoundError and `error_types` end the process with one line
  and exit code 1.
  """
  def decorate(main):
    @functools.wraps(main)
    @one_line_errors(ValueError, FileNotFoundError, *error_types)
    def wrapped(argv):
      if len(argv) > 1 and not arguments:
        raise ValueError(f"unexpected arguments {argv[1:]}" + (f"; {hint}" if hint else ""))
      if distributed:
        setup_process()
      say_library_log(quiet_console(TEMP_LOGS if log else None, log))
      return main(argv)
    return wrapped
  return decorate
