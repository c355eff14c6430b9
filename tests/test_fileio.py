"""The one atomic writer (fileio.py): at every write boundary, where a kill may land, a target is its old content or
its new content, never torn or absent; and every caller keeps that. (The token store's preparation, killed at each
boundary and rerun, is in test_store.py.)"""
import json
import os
import pathlib
import stat

import jax
import numpy as np
import pytest

from tokenformer_jax import fileio, report
from tokenformer_jax.checkpoint import write_new_run
from tokenformer_jax.config import ParamTokens, load_config, to_dict
from tokenformer_jax.data.tokenizer import train_tokenizer
from tokenformer_jax.model import abstract_params


def tree(path) -> dict | None:
  """{relative path: bytes} of a file or directory; None when it is absent."""
  path = pathlib.Path(path)
  if not path.exists():
    return None
  if path.is_file():
    return {"": path.read_bytes()}
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def at_each_boundary(monkeypatch):
  """Runs `write()` and records (step, what `look()` sees) at each of its boundaries: what a kill there leaves."""
  monkeypatch.setattr(os, "fsync", lambda fd: None)   # it matters to a crash of the machine, not to a kill's

  def run(write, look):
    seen = []
    monkeypatch.setattr(fileio, "on_boundary", lambda what: seen.append((what.rsplit(": ", 1)[1], look())))
    write()
    monkeypatch.setattr(fileio, "on_boundary", None)
    return seen
  return run


def test_a_file_is_its_old_or_its_new_content_at_every_boundary(tmp_path, at_each_boundary):
  target = tmp_path / "out" / "config.json"
  target.parent.mkdir()
  target.write_text("old")
  seen = at_each_boundary(lambda: fileio.write_json(target, {"step": 3}),
                          lambda: (target.read_text(), sorted(os.listdir(target.parent))))
  steps = [step for step, _ in seen]
  assert steps == ["temporary opened", "16 bytes written", "temporary complete", "renamed into place"]
  for step, (content, files) in seen[:3]:   # before the rename: the old file, and one temporary of it beside
    assert content == "old" and fileio.is_temporary(files[0], of="config.json") and files[1:] == ["config.json"], step
  assert seen[3][1] == ('{\n  "step": 3\n}\n', ["config.json"])
  mode = stat.S_IMODE(target.stat().st_mode)
  umask = os.umask(0)
  os.umask(umask)
  assert mode == 0o666 & ~umask   # the file's usual permissions, not a private temporary's
  # A new file is absent, then whole; an exception while streaming discards the temporary, the old file stays.
  fresh = tmp_path / "new" / "report.md"
  seen = at_each_boundary(lambda: fileio.write_text(fresh, "héllo"), lambda: tree(fresh))
  assert [content for _, content in seen] == [None, None, None, {"": "héllo".encode()}]
  with pytest.raises(ValueError), fileio.AtomicFile(target) as f:
    f.write(b"half of it")
    raise ValueError("the caller failed")
  assert os.listdir(target.parent) == ["config.json"] and target.read_text() == '{\n  "step": 3\n}\n'


def test_temporaries_are_named_one_way_and_the_old_writers_are_recognised():
  name = fileio.temporary_name("train-00000.tokens")
  assert name.startswith(".train-00000.tokens.tmp-") and fileio.is_temporary(name, of="train-00000.tokens")
  assert fileio.temporary_name("x", tag="job") == ".x.tmp-job" and fileio.temporary_name("x") != name
  assert fileio.is_temporary("..prepare.json.tmp", of=".prepare.json")        # the writer before this one
  assert not fileio.is_temporary("..prepare.json.tmp", of="manifest.json")
  assert not fileio.is_temporary("train-00000.tokens") and not fileio.is_temporary("notes.tmp")


def test_a_directory_is_its_old_or_its_new_content_at_every_boundary(tmp_path, at_each_boundary, monkeypatch):
  dst = tmp_path / "run"

  def write(content):
    def fill():
      temporary = fileio.temporary_directory(dst)
      for name, text in content.items():
        pathlib.Path(temporary, name).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(temporary, name).write_text(text)
      fileio.commit_directory(temporary, dst)
    return fill

  old, new = {"config.json": "old", "checkpoints/0/a": "old"}, {"config.json": "new", "b": "new"}
  as_bytes = lambda content: {k: v.encode() for k, v in sorted(content.items())}
  seen = at_each_boundary(write(old), lambda: tree(dst))
  assert seen == [("temporary directory made", None), ("renamed into place", as_bytes(old))]
  seen = at_each_boundary(write(new), lambda: tree(dst))   # over a directory: swapped in one step
  assert seen == [("temporary directory made", as_bytes(old)), ("swapped into place", as_bytes(new)),
                  ("old directory removed", as_bytes(new))]
  assert os.listdir(tmp_path) == ["run"]
  # Where the system cannot swap: the old one moved aside first; between the renames it is only there.
  monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
  seen = at_each_boundary(write(old), lambda: (tree(dst), [tree(tmp_path / n) for n in os.listdir(tmp_path)
                                                           if fileio.is_temporary(n, of="run")]))
  assert [step for step, _ in seen] == ["temporary directory made", "old directory moved aside",
                                        "renamed into place", "old directory removed"]
  assert seen[1][1] == (None, [as_bytes(old), as_bytes(new)]) or seen[1][1] == (None, [as_bytes(new), as_bytes(old)])
  assert seen[2][1] == (as_bytes(old), [as_bytes(new)]) and seen[3][1] == (as_bytes(old), [])


def test_remote_files_are_sent_by_one_upload_and_directories_written_in_place(tmp_path, at_each_boundary):
  import fsspec
  fs = fsspec.filesystem("memory")
  fs.pipe("/fileio/run/old", b"old")
  seen = at_each_boundary(lambda: fileio.write_text("memory://fileio/run/config.json", "new"),
                          lambda: fs.exists("/fileio/run/config.json"))
  assert seen == [("temporary opened", False), ("3 bytes written", False), ("temporary complete", False),
                  ("uploaded", True)]
  assert fs.cat("/fileio/run/config.json") == b"new"
  assert fileio.temporary_directory("memory://fileio/run") == "memory://fileio/run"
  assert not fs.exists("/fileio/run/old")   # cleared: the directory is written in place, committed by its marker
  fs.rm("/fileio", recursive=True)


def test_metrics_torn_last_line_is_skipped_on_read_and_dropped_on_resume(tmp_path):
  from tokenformer_jax.train.logger import MetricsLogger
  lines = [json.dumps({"step": s, "train/loss": 4.0 - s}) for s in (1, 2)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "train/lo')   # killed mid-line
  assert report.read_metrics(tmp_path / "metrics.jsonl") == {"train/loss": {1: 3.0, 2: 2.0}}
  log = MetricsLogger(tmp_path)   # a resume: appends after dropping the torn line
  log.write(3, {"train/loss": 1.5})
  log.close()
  assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [*lines, '{"step": 3, "train/loss": 1.5}']
  assert report.read_metrics(tmp_path / "metrics.jsonl") == {"train/loss": {1: 3.0, 2: 2.0, 3: 1.5}}
  (tmp_path / "only.jsonl").write_text('{"step": 1, "tr')   # a first line torn: nothing of it is kept
  with fileio.open_append(tmp_path / "only.jsonl") as f:
    f.write('{"step": 1}\n')
  assert (tmp_path / "only.jsonl").read_text() == '{"step": 1}\n'


# Each caller: old or new at each of its boundaries -------------------------------------------------------------
def test_grow_import_export_runs_are_the_old_or_the_new_at_every_boundary(tmp_path, at_each_boundary):
  from tokenformer_jax.interop.convert import export_run
  cfg = load_config("experiments/demo.py:test_run")
  cfg = cfg.replace(model=cfg.model.replace(param_tokens=ParamTokens.uniform(24, 48), logits_divide_by_sqrt_d=False))
  run, note = tmp_path / "run", tmp_path / "note.txt"
  note.write_text("old")
  write_new_run(run, params={"w": np.zeros(3, np.float32)}, config={"which": "old"}, files=[note])
  old = tree(run)
  note.write_text("new")
  params = jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype), abstract_params(cfg.model))   # no compile
  # What cli.grow and cli.import_neox do with --overwrite (the experiments' grown runs too).
  seen = at_each_boundary(lambda: write_new_run(run, params=params, config=to_dict(cfg), files=[note]),
                          lambda: tree(run))
  new = tree(run)
  assert new["note.txt"] == b"new" and old["note.txt"] == b"old"
  assert [step for step, _ in seen] == ["temporary directory made", "swapped into place", "old directory removed"]
  assert [content == old for _, content in seen] == [True, False, False] and seen[1][1] == seen[2][1] == new
  # cli.export_neox --overwrite
  exported = tmp_path / "exported"
  exported.mkdir()
  (exported / "config.json").write_text("an older export")
  seen = at_each_boundary(lambda: export_run(str(run), str(exported), overwrite=True, quiet=True),
                          lambda: tree(exported))
  assert [step for step, _ in seen] == ["temporary directory made", "swapped into place", "old directory removed"]
  assert seen[0][1] == {"config.json": b"an older export"} and seen[1][1] == seen[2][1] == tree(exported)
  assert json.loads((exported / "config.json").read_text())["num_layers"] == cfg.model.n_layers


def test_tokenizer_report_and_code_archive_are_the_old_or_the_new_at_every_boundary(tmp_path, at_each_boundary):
  from launch.tpu import build_archive
  model = tmp_path / "tok.model"
  texts = [f"line {i} of some text to learn a few pieces from" for i in range(20)]
  train_tokenizer(texts, str(model), 300)
  old = model.read_bytes()
  seen = at_each_boundary(lambda: train_tokenizer(texts[:10], str(model), 320, overwrite=True),
                          lambda: model.read_bytes())
  assert [content == old for _, content in seen] == [True, True, True, False] and seen[3][1] != old
  # A report over an older one: report.png, then report.md, each old or new.
  workdir, out = tmp_path / "trained", tmp_path / "report"
  fileio.write_json(workdir / "config.json", to_dict(load_config("experiments/demo.py:test_run")))
  records = [{"step": s, "train/loss": 5 - s, "eval/loss": 5.5 - s} for s in (1, 2, 3)]
  fileio.write_text(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
  out.mkdir()
  (out / "report.png").write_bytes(b"old png")
  (out / "report.md").write_text("old md")
  seen = at_each_boundary(lambda: report.write_report([workdir], out), lambda: tree(out))
  png, md = tree(out)["report.png"], tree(out)["report.md"]
  assert png.startswith(b"\x89PNG") and md.startswith(b"# trained")
  assert [(c["report.png"] == png, c["report.md"] == md) for _, c in seen] == (
      [(False, False)] * 3 + [(True, False)] * 4 + [(True, True)])
  assert all(c["report.png"] in (b"old png", png) and c["report.md"] in (b"old md", md) for _, c in seen)
  # The launcher's code archive (a new file: absent, then whole).
  archive = tmp_path / "code" / "src.tar.gz"
  seen = at_each_boundary(lambda: build_archive(archive), lambda: archive.exists())
  assert seen == [("temporary opened", False), ("temporary complete", False), ("renamed into place", True)]
