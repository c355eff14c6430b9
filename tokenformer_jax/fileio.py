"""The one atomic writer: what the package keeps on disk is there whole, or not at all, wherever a kill lands.

Every file kept for later (a run's config, checkpoints written by grow and import, token store shards and their
markers, tokenizers, reports, exports, eval/generate results) goes through here, and so do whole directories.
Not through here: the training checkpoints' step directories (Orbax writes each under a temporary name and renames
or marks it itself), TFDS's builder (the same, its own way) and the library log (appended for people to read).

Local paths, one temporary-name scheme: the bytes go to `.NAME.tmp-TAG` beside NAME (TAG: the process id and a
random word, so two writers never share one), are flushed and fsynced, then renamed over NAME (`os.replace`,
atomic on POSIX). A reader sees the old file or the new one, never a torn one; a kill leaves at most the hidden
temporary, which `is_temporary` recognises (the token store clears its own on the next run). A directory is filled
under the same kind of name and renamed into place when complete (`temporary_directory`, `commit_directory`);
over an existing directory it is swapped in one step (Linux's renameat2 RENAME_EXCHANGE), so the destination is
the old directory or the new one at every moment. Where the system cannot swap, the old one is first moved aside
to a temporary name: a kill between the two renames leaves the destination absent and the old one beside it.

gs:// (and any other fsspec URL) has no rename: a "rename" there is a copy and a delete, neither atomic nor cheap.
So a remote file is gathered in a local temporary file and sent by one upload (`put_file`), which the store
publishes only when it completes: a reader sees the old object or the new one, never a torn one, and a killed
upload leaves the old one (or none). A remote directory cannot be published at once: it is written in place (its
old contents removed first) and is committed by the marker its format reads, written last (Orbax's commit file in
a checkpoint, a token store's manifest.json); readers go by the marker.

Appended files (metrics.jsonl) are not rewritten whole: `open_append` drops a torn last line, one that a kill cut
before its newline, before appending, so the next record does not fuse with it.

Fault injection: every step of a write ends at `boundary(what)`. TOKENFORMER_JAX_KILL_AT=N makes the N-th boundary
of the process SIGKILL it (as a preemption or the OOM killer would), so a test can kill a command at each
boundary in turn and check what the rerun recovers; `on_boundary(what)`, when set (tests, in process), is called
at each one: the files on disk at that moment are exactly what a kill there would leave.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable

from etils import epath

KILL_AT = "TOKENFORMER_JAX_KILL_AT"
on_boundary: Callable[[str], None] | None = None
_boundaries = 0
_TEMPORARY = re.compile(r"^\.(?P<of>.+)\.tmp(-[^/]*)?$")


def is_remote(path) -> bool:
  return "://" in str(path) and not str(path).startswith("file://")


def on_gcs(path) -> bool:
  """Whether a TPU VM can reach `path`: the launchers keep runs, stores and code on GCS."""
  return str(path).startswith("gs://")


def _local(path) -> str:
  return os.path.abspath(str(path).removeprefix("file://"))


def _filesystem(path: str):
  import fsspec  # pylint: disable=g-import-not-at-top
  try:
    return fsspec.core.url_to_fs(path)
  except (ImportError, ValueError) as e:
    raise OSError(f"cannot reach {path}: {e}; `pip install gcsfs` to write gs:// paths") from None


def temporary_name(name: str, tag: str | None = None) -> str:
  """`.NAME.tmp-TAG`: hidden, beside NAME. The processes of one job that fill one directory together pass the
  same `tag`; everyone else gets a fresh one."""
  return f".{name}.tmp-{tag or f'{os.getpid()}-{secrets.token_hex(3)}'}"


def is_temporary(name, of: str | None = None) -> bool:
  """Whether `name` is one of this writer's temporaries (of the file `of`, if given): when no write is under way,
  a kill's leftover. The writer before this one named them `.NAME.tmp`; those count too, so that what it left
  half-written recovers."""
  match = _TEMPORARY.match(os.path.basename(str(name).rstrip("/")))
  return bool(match) and of in (None, match["of"])


def boundary(what: str) -> None:
  """The end of one step of a write: a kill here leaves what is on disk now (see the module's docstring)."""
  global _boundaries
  _boundaries += 1
  if on_boundary is not None:
    on_boundary(what)
  if os.environ.get(KILL_AT) == str(_boundaries):
    sys.stderr.write(f"{KILL_AT}={_boundaries}: killed after {what}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class AtomicFile:
  """A file written under a temporary name and published whole by `commit()`; as a context manager, committed
  on a clean exit and discarded on an exception. `file` is the open temporary (for libraries that stream)."""

  def __init__(self, path, *, tag: str | None = None):
    self.path = str(path)
    name = os.path.basename(self.path.rstrip("/"))
    if is_remote(self.path):   # gathered locally, sent by one upload on commit
      directory = tempfile.gettempdir()
    else:
      self.path = _local(self.path)
      directory = os.path.dirname(self.path)
      os.makedirs(directory, exist_ok=True)
    self.temporary = os.path.join(directory, temporary_name(name, tag))
    self.file = open(self.temporary, "wb")   # noqa: SIM115 (closed by commit or discard)
    self._written = 0
    boundary(f"{self.path}: temporary opened")

  def write(self, data) -> int:
    n = self.file.write(data)
    self._written += n
    boundary(f"{self.path}: {self._written} bytes written")
    return n

  def commit(self) -> None:
    self.file.flush()
    os.fsync(self.file.fileno())   # a crash of the machine, not only of the process, also leaves old or new
    self.file.close()
    boundary(f"{self.path}: temporary complete")
    if is_remote(self.path):
      fs, target = _filesystem(self.path)
      try:
        fs.put_file(self.temporary, target)
      finally:
        os.remove(self.temporary)
      boundary(f"{self.path}: uploaded")
    else:
      os.replace(self.temporary, self.path)
      boundary(f"{self.path}: renamed into place")

  def discard(self) -> None:
    self.file.close()
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.temporary)

  def __enter__(self) -> AtomicFile:
    return self

  def __exit__(self, kind, value, traceback) -> None:
    if kind is None:
      self.commit()
    else:
      self.discard()


def write_bytes(path, data: bytes) -> None:
  with AtomicFile(path) as f:
    f.write(data)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path, value) -> None:
  write_text(path, json.dumps(value, indent=2) + "\n")


def remove(path) -> None:
  """Delete a file (a step of a write too: a kill between two deletions leaves some)."""
  if is_remote(path):
    fs, target = _filesystem(str(path))
    fs.rm(target)
  else:
    os.remove(_local(path))
  boundary(f"{path}: removed")


# Directories -------------------------------------------------------------------------------------------------
def check_destination(dst, *, overwrite: bool, source=None, flag: str = "--dst") -> None:
  """The one refusal of a directory a tool is asked to write (grow, import, export), a ValueError in one line:
  a file, a non-empty directory without `overwrite`, or one inside, above or equal to `source`, which tools
  never write into. (Writing it then goes through temporary_directory and commit_directory.)"""
  path = epath.Path(dst)
  if source is not None and not is_remote(dst) and not is_remote(source):
    a, b = os.path.realpath(_local(source)), os.path.realpath(_local(dst))
    if a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep):
      raise ValueError(f"{flag}={dst} overlaps the source {source}; a tool never writes into its source")
  if path.exists() and not path.is_dir():
    raise ValueError(f"{flag}={dst} is a file; give a directory")
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise ValueError(f"{flag}={dst} is not empty; choose a new directory or pass --overwrite")


def temporary_directory(dst, *, tag: str | None = None, create: bool = True) -> str:
  """Where to fill a directory that `commit_directory` makes `dst`: locally `.NAME.tmp-TAG` beside it, made empty
  (a leftover of the same tag, a killed attempt of the same job, is removed first); remotely `dst` itself, its old
  contents removed (see the module's docstring). `create=False` only names it: what the other processes of a job
  do while the first one prepares it."""
  dst = str(dst).rstrip("/")
  if is_remote(dst):
    if create:
      fs, target = _filesystem(dst)
      if fs.exists(target):
        fs.rm(target, recursive=True)
      boundary(f"{dst}: cleared to be written in place")
    return dst
  dst = _local(dst)
  temporary = os.path.join(os.path.dirname(dst), temporary_name(os.path.basename(dst), tag))
  if create:
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    boundary(f"{dst}: temporary directory made")
  return temporary


def commit_directory(temporary, dst) -> None:
  """Make the complete directory `temporary` the directory `dst`, replacing whatever was there."""
  temporary, dst = str(temporary).rstrip("/"), str(dst).rstrip("/")
  if is_remote(dst):
    boundary(f"{dst}: written in place")
    return
  dst = _local(dst)
  if not os.path.exists(dst) or (os.path.isdir(dst) and not os.listdir(dst)):
    os.replace(temporary, dst)
    boundary(f"{dst}: renamed into place")
    return
  if _exchange(temporary, dst):
    boundary(f"{dst}: swapped into place")
  else:
    aside = os.path.join(os.path.dirname(dst), temporary_name(os.path.basename(dst)))
    os.rename(dst, aside)
    boundary(f"{dst}: old directory moved aside")
    os.rename(temporary, dst)
    boundary(f"{dst}: renamed into place")
    temporary = aside
  shutil.rmtree(temporary)
  boundary(f"{dst}: old directory removed")


def _exchange(a: str, b: str) -> bool:
  """Swap two paths in one step (renameat2 with RENAME_EXCHANGE); False where the system cannot."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  at_cwd, exchange = -100, 2
  if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
    return False
  raise OSError(code, os.strerror(code), b)


# Appended files ----------------------------------------------------------------------------------------------
def open_append(path):
  """`path` opened for appending text lines, after dropping a torn last line (bytes after the last newline: a
  record a kill cut short, which would otherwise fuse with the next one). Remote files are opened through
  etils.epath as before (an object store keeps whole objects: no torn line to drop)."""
  if is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path).open("a")
  path = _local(path)
  with contextlib.suppress(FileNotFoundError), open(path, "r+b") as f:
    end = keep = f.seek(0, os.SEEK_END)
    while keep > 0:   # back from the end, a block at a time, to the last newline
      start = max(keep - 4096, 0)
      f.seek(start)
      newline = f.read(keep - start).rfind(b"\n")
      keep = start + newline + 1 if newline >= 0 else start
      if newline >= 0:
        break
    if keep < end:
      f.truncate(keep)
      boundary(f"{path}: torn last line dropped")
  return open(path, "a", encoding="utf-8")  # noqa: SIM115 (the caller's, for its lifetime)
