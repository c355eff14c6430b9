"""Data layer: tokenizer, sources, the grain pipeline (every token once per epoch, exact resume), errors, TFDS.

The token store itself (prepare, lazy reading, resume, bad stores) is tested in test_store.py.
"""
import collections
import gzip
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers import CORPUS

from tokenformer_jax.config import SHIPPED_TOKENIZER, DataConfig
from tokenformer_jax.data import DataError, pipeline, sources
from tokenformer_jax.data.tokenizer import Tokenizer, train_tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shipped_docs():
  with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tok(shipped_docs, tmp_path_factory):
  """A 400-piece BPE trained on 6 shipped documents in ~0.03 s (300 pieces cannot hold the 260 special and
  byte ids plus this text's characters)."""
  path = tmp_path_factory.mktemp("tok") / "small.model"
  return train_tokenizer([d["text"] for d in shipped_docs[:6]], str(path), 400)


def write_jsonl(path, records, compress=False):
  data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
  path.write_bytes(gzip.compress(data) if compress else data)


@pytest.fixture
def corpus(tmp_path, shipped_docs):
  """Four files of four kinds, 14 documents in sorted-glob order: 12 real ones (slices of the shipped corpus)
  in .jsonl and .jsonl.gz, one .txt with non-ASCII text, one .txt.gz."""
  docs = [{"id": f"doc{i}", "text": d["text"][:1500 + 250 * i]} for i, d in enumerate(shipped_docs[8:20])]
  write_jsonl(tmp_path / "a.jsonl", docs[:6])
  write_jsonl(tmp_path / "b.jsonl.gz", docs[6:12], compress=True)
  (tmp_path / "c.txt").write_text("A plain text file is one document.\n\n  Ünïcödé: ✓ 😀\n", encoding="utf-8")
  (tmp_path / "d.txt.gz").write_bytes(gzip.compress(b"A gzipped text file, also one document."))
  texts = [d["text"] for d in docs] + [(tmp_path / "c.txt").read_text(encoding="utf-8"),
                                       "A gzipped text file, also one document."]
  return tmp_path, texts


def expected_windows(texts, tokenizer, seq_len, count):
  """The documented scheme, written independently: [eos] + doc + [eos] + ..., windows overlapping by one."""
  stream = [tokenizer.eos_id]
  for text in texts:
    stream += tokenizer.encode(text) + [tokenizer.eos_id]
  windows = []
  for k in range(count):
    chunk = stream[k * seq_len: k * seq_len + seq_len + 1]
    windows.append(tuple(chunk + [tokenizer.pad_id] * (seq_len + 1 - len(chunk))))
  return stream, windows


def rows(batches):
  return [tuple(r) for b in batches for r in b["tokens"].tolist()]


# Tokenizer ---------------------------------------------------------------------------------------------
def test_shipped_tokenizer_ids_and_exact_round_trip(shipped_docs):
  t = Tokenizer.load(str(SHIPPED_TOKENIZER))
  assert (t.vocab_size, t.pad_id, t.unk_id, t.bos_id, t.eos_id) == (2048, 0, 1, 2, 3)
  assert SHIPPED_TOKENIZER.stat().st_size < 64_000
  texts = [d["text"] for d in shipped_docs[:20]]
  encoded = t.encode_batch(texts)
  assert all(t.decode(ids) == text for ids, text in zip(encoded, texts))
  n_bytes, n_tokens = sum(len(x.encode()) for x in texts), sum(map(len, encoded))
  assert 2.5 < n_bytes / n_tokens < 4.0, n_bytes / n_tokens    # seen: 3.0 bytes per token
  weird = "  two  spaces\n\n\ttab\r\n é 中文 🙂 \x00\x7f end  "
  ids = t.encode(weird)
  assert t.decode(ids) == weird and t.decode(np.array(ids)) == weird
  assert max(ids) < 2048 and min(ids) > t.eos_id    # no unk, no specials: unknown characters become bytes
  assert t.decode([t.bos_id] + ids + [t.eos_id, t.pad_id]) == weird


def test_train_tokenizer_is_deterministic_atomic_and_will_not_overwrite(tmp_path, shipped_docs):
  texts = [d["text"] for d in shipped_docs[:4]]
  with pytest.raises(DataError, match=r"training failed: Vocabulary size is smaller than required_chars\. 320 vs"):
    train_tokenizer(texts, str(tmp_path / "m.model"), 320)   # 260 special and byte ids + 84 characters
  first = train_tokenizer(texts, str(tmp_path / "m.model"), 400)
  before = (tmp_path / "m.model").read_bytes()
  with pytest.raises(DataError, match="already exists.*overwrite"):
    train_tokenizer(texts[:1], str(tmp_path / "m.model"), 400)
  assert (tmp_path / "m.model").read_bytes() == before
  second = train_tokenizer(texts, str(tmp_path / "m.model"), 400, overwrite=True)
  assert (tmp_path / "m.model").read_bytes() == before and first.fingerprint == second.fingerprint
  assert [p.name for p in tmp_path.iterdir()] == ["m.model"]     # no temporary file left behind
  loaded = Tokenizer.load(str(tmp_path / "m.model"))
  assert loaded.vocab_size == 400 and loaded.encode(texts[0][:500]) == first.encode(texts[0][:500])
  with pytest.raises(DataError, match="no text"):
    train_tokenizer(["", "\n\n"], str(tmp_path / "empty.model"), 400)
  with pytest.raises(DataError, match="too small"):
    train_tokenizer(texts, str(tmp_path / "tiny.model"), 100)
  assert not (tmp_path / "empty.model").exists() and not (tmp_path / "tiny.model").exists()


def test_tokenizer_load_errors(tmp_path):
  with pytest.raises(DataError, match="not found.*tokenformer_jax.data.tokenizer"):
    Tokenizer.load(str(tmp_path / "missing.model"))
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(DataError, match="not a SentencePiece model"):
    Tokenizer.load(str(tmp_path / "junk.model"))


@pytest.mark.slow
def test_tokenizer_cli(tmp_path, corpus):
  root, _ = corpus
  out = tmp_path / "out" / "cli.model"
  cmd = [sys.executable, "-m", "tokenformer_jax.data.tokenizer", f"--input={root}/*.jsonl,{root}/*.txt",
         f"--output={out}", "--vocab_size=400"]
  done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, timeout=60)
  assert done.returncode == 0, done.stderr
  assert Tokenizer.load(str(out)).vocab_size == 400 and "wrote" in done.stdout
  again = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, timeout=60)
  assert again.returncode == 1 and again.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "already exists" in again.stderr
  missing_cmd = [*cmd[:3], f"--input={root}/nothing*.jsonl", f"--output={tmp_path}/x.model", "--vocab_size=400"]
  missing = subprocess.run(missing_cmd, check=False, capture_output=True, text=True, cwd=REPO, timeout=60)
  assert missing.returncode == 1 and "error: no files match" in missing.stderr


# Sources and the held-out split ------------------------------------------------------------------------
def test_sources_read_every_format_in_order(corpus):
  root, texts = corpus
  docs = sources.read_documents([f"{root}/*.jsonl*", f"{root}/*.txt*", f"{root}/a.jsonl"])  # a.jsonl twice
  assert [d.text for d in docs] == texts
  assert [d.key for d in docs][:3] == ["doc0", "doc1", "doc2"] and docs[-2].key == "c.txt"


def test_validation_split_is_a_stable_hash_of_document_ids():
  docs = [sources.Document(f"id-{i}", f"text {i}") for i in range(400)]
  train, validation = sources.hold_out(docs, 0.25)
  assert 70 < len(validation) < 130 and len(train) + len(validation) == 400
  # The same documents in another order (another glob order, another host) give the same split.
  _, validation_r = sources.hold_out(docs[::-1], 0.25)
  assert {d.key for d in validation_r} == {d.key for d in validation}
  # Fixed across runs and machines: BLAKE2b, not Python's salted hash. (Value computed once, by hand.)
  assert sources.stable_fraction("id-0") == pytest.approx(0.6570412, abs=1e-7)
  # A tiny corpus still gets a validation document; nothing is held out with fraction 0.
  assert len(sources.hold_out(docs[:3], 0.05)[1]) == 1
  assert sources.hold_out(docs[:3], 0.0) == (docs[:3], [])


# The training pipeline ---------------------------------------------------------------------------------
@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_each_token_is_a_target_exactly_once_per_epoch_across_hosts(corpus, tok, process_count):
  root, texts = corpus
  seq_len, global_batch = 40, 6
  data = DataConfig(train_files=(f"{root}/*",), validation_fraction=0.0, seq_len=seq_len, shuffle_seed=7)
  steps = pipeline.steps_per_epoch(data, tok, global_batch=global_batch)
  stream, windows = expected_windows(texts, tok, seq_len, steps * global_batch)
  real = -(-(len(stream) - 1) // seq_len)
  assert steps == -(-real // global_batch) and steps >= 10
  assert (len(stream) - 1) % seq_len and steps * global_batch > real   # a padded tail and all-padding rows
  hosts = [pipeline.make_train_iterator(data, tok, global_batch=global_batch, process_index=p,
                                        process_count=process_count) for p in range(process_count)]
  epoch = [[next(it) for _ in range(steps)] for it in hosts]
  for host in epoch:
    for b in host:
      assert b["tokens"].shape == (global_batch // process_count, seq_len + 1) and b["tokens"].dtype == np.int32
      assert b["mask"].shape == (global_batch // process_count, seq_len) and b["mask"].dtype == np.float32
      # The mask marks exactly the real targets (a real token never equals pad here).
      np.testing.assert_array_equal(b["mask"], (b["tokens"][:, 1:] != tok.pad_id).astype(np.float32))
  # The epoch is exactly the documented windows (real ones once each, plus all-padding fillers)...
  assert sorted(r for host in epoch for r in rows(host)) == sorted(windows)
  # ...so the targets are the corpus: every document's tokens and its closing eos, each once.
  targets = collections.Counter(
      int(t) for host in epoch for b in host for t in b["tokens"][:, 1:][b["mask"] > 0])
  corpus_tokens = collections.Counter(t for text in texts for t in tok.encode(text) + [tok.eos_id])
  assert targets == corpus_tokens and sum(targets.values()) == len(stream) - 1
  # Step b's global batch is the same rows whatever the number of hosts: row r of host p is row r·P + p.
  single = pipeline.make_train_iterator(data, tok, global_batch=global_batch)
  for b in range(steps):
    expected = next(single)["tokens"]
    for p in range(process_count):
      np.testing.assert_array_equal(epoch[p][b]["tokens"], expected[p::process_count])


def test_epochs_reshuffle_deterministically(corpus, tok):
  root, _ = corpus
  data = DataConfig(train_files=(f"{root}/*",), validation_fraction=0.0, seq_len=40, shuffle_seed=3)
  steps = pipeline.steps_per_epoch(data, tok, global_batch=4)
  it = pipeline.make_train_iterator(data, tok, global_batch=4)
  first, second = rows(next(it) for _ in range(steps)), rows(next(it) for _ in range(steps))
  assert sorted(first) == sorted(second) and first != second       # a new order, the same windows
  again = pipeline.make_train_iterator(data, tok, global_batch=4)
  assert rows(next(again) for _ in range(2 * steps)) == first + second
  other = pipeline.make_train_iterator(data, tok, global_batch=4, seed=4)
  assert rows(next(other) for _ in range(steps)) != first
  in_order = rows(pipeline.make_eval_batches(data.replace(validation_files=(f"{root}/*",)), tok,
                                            global_batch=4, max_batches=steps))
  assert sorted(in_order) == sorted(first) and in_order != first      # shuffled, not file order


def test_iterator_state_resumes_at_the_exact_next_batch(corpus, tok):
  root, _ = corpus
  data = DataConfig(train_files=(f"{root}/*",), validation_fraction=0.0, seq_len=40)
  steps = pipeline.steps_per_epoch(data, tok, global_batch=4)
  it = pipeline.make_train_iterator(data, tok, global_batch=4, process_index=1, process_count=2)
  for _ in range(steps + 3):     # into the second epoch
    next(it)
  state = json.loads(json.dumps(it.get_state()))       # plain JSON: what a checkpoint stores
  expected = [next(it) for _ in range(steps)]           # crosses into the third epoch
  resumed = pipeline.make_train_iterator(data, tok, global_batch=4, process_index=1, process_count=2)
  next(resumed)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["mask"], want["mask"])


def test_iterator_state_through_an_orbax_checkpoint(tmp_path, corpus, tok):
  import orbax.checkpoint as ocp
  root, _ = corpus
  data = DataConfig(train_files=(f"{root}/*",), validation_fraction=0.0, seq_len=40)
  it = pipeline.make_train_iterator(data, tok, global_batch=4, process_index=1, process_count=2)
  for _ in range(5):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:   # as RunCheckpoints saves it
    manager.save(5, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
    manager.wait_until_finished()
  expected = [next(it)["tokens"] for _ in range(3)]
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    state = manager.restore(5, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
  assert state["position"] == 5 * 4
  fresh = pipeline.make_train_iterator(data, tok, global_batch=4)   # one host now: all 4 rows of each batch
  fresh.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh)["tokens"][1::2], want)


# Evaluation batches ------------------------------------------------------------------------------------
def test_eval_batches_are_the_validation_split_in_order(corpus, tok, tmp_path):
  root, texts = corpus
  data = DataConfig(train_files=(f"{root}/a.jsonl",), validation_files=(f"{root}/b.jsonl.gz",), seq_len=40)
  batches = pipeline.make_eval_batches(data, tok, global_batch=4, max_batches=1000)
  stream, windows = expected_windows(texts[6:12], tok, 40, 4 * len(batches))
  assert len(batches) == -(-(len(stream) - 1) // (40 * 4))
  assert rows(batches) == windows                         # in order, no shuffle, tail padded and masked
  assert sum(float(b["mask"].sum()) for b in batches) == len(stream) - 1
  two_hosts = [pipeline.make_eval_batches(data, tok, global_batch=4, max_batches=1000, process_index=p,
                                          process_count=2) for p in range(2)]
  for b, h0, h1 in zip(batches, *two_hosts):
    np.testing.assert_array_equal(b["tokens"][0::2], h0["tokens"])
    np.testing.assert_array_equal(b["tokens"][1::2], h1["tokens"])
  capped = pipeline.make_eval_batches(data, tok, global_batch=4, max_batches=2)
  assert len(capped) == 2 and rows(capped) == rows(batches[:2])
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "one.txt").write_text("the only document")
  alone = data.replace(train_files=(str(tmp_path / "empty" / "one.txt"),), validation_files=())
  with pytest.raises(DataError, match="validation split is empty"):
    pipeline.make_eval_batches(alone, tok, global_batch=4, max_batches=10)


# Errors ------------------------------------------------------------------------------------------------
def bad_corpus(tmp_path, case):
  if case == "no_match":
    return f"{tmp_path}/nothing-*.jsonl"
  if case == "empty_files":
    write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": ""}])
    (tmp_path / "f.txt").write_text("")
    (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress(b"\n\n"))
    return f"{tmp_path}/*"
  if case == "malformed_json":
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": "cut off\n{"text": "x"}\n')
  if case == "not_utf8":
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  if case == "not_utf8_txt":
    (tmp_path / "bad.txt").write_bytes(b"line one\nline two \xff\xfe\n")
  if case == "missing_field":
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "ok"}, {"body": "where is text?"}])
  if case == "not_gzip":
    (tmp_path / "bad.jsonl.gz").write_bytes(b'{"text": "not compressed"}\n')
  if case == "wrong_suffix":
    (tmp_path / "bad.csv").write_text("a,b\n")
  return f"{tmp_path}/bad*"


@pytest.mark.parametrize("case, pattern", [
    ("no_match", r"no files match '.*nothing-\*\.jsonl'"),
    ("empty_files", r"no text in .*e\.jsonl.*every document is empty"),
    ("malformed_json", r"bad\.jsonl:3: malformed JSON .*one complete JSON object"),
    ("not_utf8", r"bad\.jsonl: line 2 is not valid UTF-8 .*re-encode"),
    ("not_utf8_txt", r"bad\.txt: line 2 is not valid UTF-8 \(byte 0xff\)"),
    ("missing_field", r"bad\.jsonl:3: the JSON object has no field 'text' \(its fields: 'body'\); set DataConfig"),
    ("not_gzip", r"bad\.jsonl\.gz: not a readable gzip file"),
    ("wrong_suffix", r"bad\.csv: unsupported file type"),
])
def test_bad_input_gives_one_clear_error(tmp_path, tok, case, pattern):
  data = DataConfig(train_files=(bad_corpus(tmp_path, case),), seq_len=16)
  with pytest.raises(DataError, match=pattern) as info:
    pipeline.make_train_iterator(data, tok, global_batch=2)
  assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_bad_settings(corpus, tok):
  root, _ = corpus
  data = DataConfig(train_files=(f"{root}/*",), seq_len=16)
  with pytest.raises(DataError, match="multiple of the number of hosts"):
    pipeline.make_train_iterator(data, tok, global_batch=5, process_count=2)
  with pytest.raises(DataError, match="no field 'body'"):
    pipeline.make_train_iterator(data.replace(text_field="body"), tok, global_batch=2)
  with pytest.raises(DataError, match="validation_fraction"):
    pipeline.make_train_iterator(data.replace(validation_fraction=1.0), tok, global_batch=2)


# TFDS --------------------------------------------------------------------------------------------------
def test_tfds_builder_round_trip_without_tensorflow(tmp_path, corpus, tok):
  import tensorflow_datasets as tfds

  from tokenformer_jax.data.tfds_builder import build_tfds_dataset
  assert importlib.util.find_spec("tensorflow") is None      # this works without TensorFlow installed
  root, _ = corpus
  files = (f"{root}/*.jsonl*", f"{root}/*.txt*")
  path = build_tfds_dataset("tiny_docs", str(tmp_path / "tfds"), files, validation_fraction=0.2)
  assert sorted(p.name for p in path.iterdir() if "array_record" in p.name) == [
      "tiny_docs-train.array_record-00000-of-00001", "tiny_docs-validation.array_record-00000-of-00001"]
  train_docs, validation_docs = sources.hold_out(sources.read_documents(files), 0.2)
  for split, docs in (("train", train_docs), ("validation", validation_docs)):
    source = tfds.data_source("tiny_docs", split=split, data_dir=str(tmp_path / "tfds"), download=False)
    got = sorted((r["id"].decode(), r["text"].decode()) for r in source)
    assert got == sorted((d.key, d.text) for d in docs) and len(got) > 0
  with pytest.raises(DataError, match="already exists"):
    build_tfds_dataset("tiny_docs", str(tmp_path / "tfds"), files)
  # The pipeline reads it by name + data_dir: the same tokens as from the files (TFDS stores its own order).
  from_tfds = DataConfig(tfds_name="tiny_docs", tfds_data_dir=str(tmp_path / "tfds"), seq_len=40)
  from_files = DataConfig(train_files=files, validation_fraction=0.2, seq_len=40)
  def targets(batches):
    return collections.Counter(int(t) for b in batches for t in b["tokens"][:, 1:][b["mask"] > 0])
  steps = pipeline.steps_per_epoch(from_tfds, tok, global_batch=4)
  assert steps == pipeline.steps_per_epoch(from_files, tok, global_batch=4)
  tfds_it, files_it = (pipeline.make_train_iterator(d, tok, global_batch=4) for d in (from_tfds, from_files))
  assert targets(next(tfds_it) for _ in range(steps)) == targets(next(files_it) for _ in range(steps))
  assert targets(pipeline.make_eval_batches(from_tfds, tok, global_batch=4, max_batches=99)) == targets(
      pipeline.make_eval_batches(from_files, tok, global_batch=4, max_batches=99))
  with pytest.raises(DataError, match="no split 'test'"):
    pipeline.make_eval_batches(from_tfds.replace(tfds_validation_split="test"), tok, global_batch=4,
                               max_batches=1)
  with pytest.raises(DataError, match="not found in data_dir"):
    pipeline.make_train_iterator(from_tfds.replace(tfds_name="no_such_docs"), tok, global_batch=4)
