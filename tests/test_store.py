"""The token store: prepared once (data/prepare.py), read lazily (data/store.py), the same batches as from text."""
import collections
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers import CORPUS

from tokenformer_jax.config import SHIPPED_TOKENIZER, DataConfig
from tokenformer_jax.data import DataError, pipeline, prepare, sources, store
from tokenformer_jax.data.tokenizer import Tokenizer, train_tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARD_TOKENS = 40_000   # the shipped corpus (~570k tokens) in ~14 train shards; windows cross their boundaries


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load(str(SHIPPED_TOKENIZER))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, tok):
  """The shipped corpus as DataConfig and as a store prepared in this process, small shards."""
  data = DataConfig(train_files=(str(CORPUS),), validation_fraction=0.1, seq_len=128, shuffle_seed=11)
  path = str(tmp_path_factory.mktemp("stores") / "shipped")
  manifest = prepare.prepare(data, tok, path, shard_tokens=SHARD_TOKENS, workers=0, progress=False)
  return data, path, manifest


def in_memory_stream(docs, tokenizer):
  """Today's (pre-store) tokenize_documents, kept here as the reference: [eos] + doc + [eos] + ... as int32."""
  eos = [tokenizer.eos_id]
  ids = eos + [t for d in docs for t in tokenizer.encode(d.text) + eos] if docs else []
  return pipeline.TokenStream(np.array(ids, np.int32), len(docs))


def files_of(path):
  root = pathlib.Path(path)
  return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_store_gives_todays_stream_and_batches(shipped, tok):
  data, path, manifest = shipped
  train_docs, validation_docs = sources.load_splits(data)
  expected = {"train": in_memory_stream(train_docs, tok), "validation": in_memory_stream(validation_docs, tok)}
  opened = store.TokenStore(path, tok)
  assert manifest["dtype"] == "<u2" and len(manifest["splits"]["train"]["shards"]) >= 10
  for split in store.SPLITS:
    got = opened.splits[split]
    assert got.num_documents == expected[split].num_documents > 0
    np.testing.assert_array_equal(got[0:len(got)], expected[split].ids)    # the whole stream, exactly
    starts = [int(s) for s in got._starts[1:-1]]                          # slices across shard boundaries
    for a, b in [(0, 1), (0, 300), (starts[0] - 5, starts[0] + 5), (starts[-1] - 1, len(got) + 10)]:
      np.testing.assert_array_equal(got[a:b], expected[split].ids[a:b])
  # Same seed → same batches, epoch after epoch, per host: the store vs today's in-memory windows.
  stored = data.replace(store=path)
  global_batch, steps = 16, pipeline.steps_per_epoch(stored, tok, global_batch=16)
  windows = pipeline.Windows(expected["train"], data.seq_len, tok.pad_id)
  padded = pipeline.Windows(expected["train"], data.seq_len, tok.pad_id, -(-windows.num_real // 16) * 16)
  assert steps == len(padded) // global_batch > 20
  for p in range(2):
    ours = pipeline.make_train_iterator(stored, tok, global_batch=global_batch, process_index=p, process_count=2)
    todays = pipeline.windows_iterator(padded, seed=data.shuffle_seed, local_batch=8, process_index=p,
                                       process_count=2)
    for _ in range(2 * steps):
      x, y = next(ours), next(todays)
      np.testing.assert_array_equal(x["tokens"], y["tokens"])
      np.testing.assert_array_equal(x["mask"], y["mask"])
  eval_batches = pipeline.make_eval_batches(stored, tok, global_batch=4, max_batches=1000)
  want = pipeline.Windows(expected["validation"], data.seq_len, tok.pad_id, 4 * len(eval_batches))
  np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in eval_batches]),
                                np.stack([want[i]["tokens"] for i in range(len(want))]))
  # The files themselves (no data.store) go through a cached store: the same batches again.
  cached = pipeline.make_train_iterator(data, tok, global_batch=global_batch)
  again = pipeline.make_train_iterator(stored, tok, global_batch=global_batch)
  for _ in range(3):
    np.testing.assert_array_equal(next(cached)["tokens"], next(again)["tokens"])
  assert pipeline.store_path(data, tok).startswith(os.environ["TOKENFORMER_JAX_CACHE"])


def test_killed_preparation_resumes_byte_identical_and_remote_store(shipped, tok, tmp_path):
  data, path, manifest = shipped
  killed = str(tmp_path / "killed")
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(data, tok, killed, shard_tokens=SHARD_TOKENS, workers=0, progress=False, _stop_after_shards=5)
  assert not (tmp_path / "killed" / "manifest.json").exists()
  assert sum(name.endswith(".json") and "-" in name for name in os.listdir(killed)) == 5
  assert any(name.endswith(".tmp") for name in os.listdir(killed))       # a half-written shard, as a kill leaves
  (tmp_path / "killed" / "train-00003.json").unlink()                    # and a shard whose marker never landed
  with pytest.raises(DataError, match="holds an unfinished preparation of other inputs or settings"):
    prepare.prepare(data, tok, killed, shard_tokens=SHARD_TOKENS + 1, workers=0, progress=False)
  # The rerun tokenizes in a pool of 2 processes: the same bytes as the uninterrupted in-process run.
  again = prepare.prepare(data, tok, killed, shard_tokens=SHARD_TOKENS, workers=2, progress=False)
  assert again == manifest and files_of(killed) == files_of(path)
  with pytest.raises(DataError, match="finished token store and is never overwritten") as info:
    prepare.prepare(data, tok, killed, shard_tokens=SHARD_TOKENS, workers=0, progress=False)
  assert "\n" not in str(info.value) and files_of(killed) == files_of(path)
  # A remote store (fsspec; memory:// stands in for gs://): the same bytes written, the same batches read.
  import fsspec
  remote = "memory://stores/shipped"
  prepare.prepare(data, tok, remote, shard_tokens=SHARD_TOKENS, workers=0, progress=False)
  fs = fsspec.filesystem("memory")
  assert {n: fs.cat_file(f"/stores/shipped/{n}") for n in files_of(path)} == files_of(path)
  a = pipeline.make_train_iterator(data.replace(store=remote), tok, global_batch=8)
  b = pipeline.make_train_iterator(data.replace(store=path), tok, global_batch=8)
  for _ in range(5):
    np.testing.assert_array_equal(next(a)["tokens"], next(b)["tokens"])
  fs.rm("/stores", recursive=True)


def test_four_hosts_read_disjoint_rows_and_resume_exactly(shipped, tok, monkeypatch):
  data, path, _ = shipped
  stored, global_batch, hosts = data.replace(store=path), 8, 4
  reads: dict[int, list[int]] = {}
  original = pipeline.Windows.__getitem__

  def recording(self, index):
    reads.setdefault(id(self), []).append(int(index))
    return original(self, index)

  monkeypatch.setattr(pipeline.Windows, "__getitem__", recording)
  created = []
  original_train_windows = pipeline.train_windows
  monkeypatch.setattr(pipeline, "train_windows", lambda *a, **k: created.append(original_train_windows(*a, **k))
                      or created[-1])
  single = pipeline.make_train_iterator(stored, tok, global_batch=global_batch)
  its = [pipeline.make_train_iterator(stored, tok, global_batch=global_batch, process_index=p, process_count=hosts)
         for p in range(hosts)]
  steps = pipeline.steps_per_epoch(stored, tok, global_batch=global_batch)
  for _ in range(steps + 2):   # into the second epoch
    whole = next(single)
    parts = [next(it) for it in its]
    for p in range(hosts):      # row r of host p is row r·4 + p of the global batch
      np.testing.assert_array_equal(parts[p]["tokens"], whole["tokens"][p::hosts])
      np.testing.assert_array_equal(parts[p]["mask"], whole["mask"][p::hosts])
  # Each host read only its own rows: its positions p, p + 4, ... of the shuffled order (prefetch included).
  import grain
  windows = created[1:1 + hosts]
  order = grain.MapDataset.range(len(windows[0])).shuffle(seed=data.shuffle_seed).repeat()
  per_host = [reads[id(w)] for w in windows]
  epoch_rows = []
  for p, got in enumerate(per_host):
    mine = [order[i] for i in range(p, (steps + 20) * global_batch, hosts)]   # this host's positions, in order
    consumed = (steps + 2) * global_batch // hosts
    # Read: every row it consumed, and otherwise only its own next positions (grain's threads read ahead).
    assert not collections.Counter(got) - collections.Counter(mine[:len(got) + 64]), p
    assert not collections.Counter(mine[:consumed]) - collections.Counter(got), p
    epoch_rows.append(set(mine[:steps * global_batch // hosts]))   # epoch 1
  assert sum(map(len, epoch_rows)) == len(set().union(*epoch_rows)) == len(windows[0])   # disjoint, all rows
  # Resume: each host's state (JSON, as a checkpoint stores it) continues at the exact next batch.
  states = [json.loads(json.dumps(it.get_state())) for it in its]
  want = [[next(it)["tokens"] for _ in range(3)] for it in its]
  for p in range(hosts):
    fresh = pipeline.make_train_iterator(stored, tok, global_batch=global_batch, process_index=p, process_count=hosts)
    fresh.set_state(states[p])
    for w in want[p]:
      np.testing.assert_array_equal(next(fresh)["tokens"], w)


def copy_store(src, dst):
  dst.mkdir()
  for name, data in files_of(src).items():
    (dst / name).write_bytes(data)
  return str(dst)


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"train-00002\.tokens: missing \(the store's manifest lists it\)"),
    ("truncated", r"train-00002\.tokens: 79998 bytes, the manifest says \d+ \(truncated\)"),
    ("manifest_count", r"train-00001\.tokens: \d+ bytes, the manifest says \d+ \(longer than the manifest says\)"),
    ("manifest_totals", r"manifest\.json: the train split's totals .* the manifest does not match its shards"),
    ("tokenizer", r"manifest\.json: the store was tokenized with another tokenizer \(fingerprint \w+ .* set data"),
    ("not_a_store", r"manifest\.json not found: .* is not a finished token store"),
])
def test_bad_store_gives_one_line_naming_the_file(shipped, tok, tmp_path, case, pattern):
  data, path, _ = shipped
  bad = copy_store(path, tmp_path / "bad")
  manifest = json.loads((tmp_path / "bad" / "manifest.json").read_text())
  other = tok
  if case == "missing":
    (tmp_path / "bad" / "train-00002.tokens").unlink()
  elif case == "truncated":
    with open(tmp_path / "bad" / "train-00002.tokens", "r+b") as f:
      f.truncate(79_998)
  elif case in ("manifest_count", "manifest_totals"):
    if case == "manifest_count":   # a shard's count (and the totals) edited: its file is now longer
      manifest["splits"]["train"]["shards"][1]["tokens"] -= 7
      manifest["splits"]["train"]["tokens"] -= 7
    else:
      manifest["splits"]["train"]["documents"] += 1
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(manifest))
  elif case == "tokenizer":
    other = train_tokenizer(["some other text to learn from"] * 5, str(tmp_path / "other.model"), 300)
  elif case == "not_a_store":
    (tmp_path / "bad" / "manifest.json").unlink()
  before = files_of(bad)
  with pytest.raises(DataError, match=pattern) as info:
    pipeline.make_train_iterator(data.replace(store=bad), other, global_batch=8)
  assert "\n" not in str(info.value) and files_of(bad) == before    # one line; nothing touched


def test_prepare_cli_refuses_to_overwrite_and_verifies(shipped, tmp_path):
  data, path, manifest = shipped
  out = tmp_path / "cli"
  corpus = tmp_path / "three.jsonl"   # three documents, no hash below 0.05: hold_out's smallest-hash rule
  corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document number {i} " * 20}) + "\n"
                            for i in (0, 1, 2)))
  three = DataConfig(train_files=(str(corpus),), validation_fraction=0.05)
  _, held = sources.load_splits(three)
  assert len(held) == 1 and sources.stable_fraction(held[0].key) >= 0.05
  corrupt = copy_store(path, tmp_path / "corrupt")
  raw = bytearray((tmp_path / "corrupt" / "validation-00000.tokens").read_bytes())
  raw[100] ^= 1
  (tmp_path / "corrupt" / "validation-00000.tokens").write_bytes(bytes(raw))
  def cli(*flags):
    return subprocess.run([sys.executable, "-m", "tokenformer_jax.data.prepare", *flags], capture_output=True,
                          text=True, cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})

  first = cli(f"--store={out}", f"--train_files={corpus}", "--workers=0", "--validation_fraction=0.05")
  assert first.returncode == 0 and "wrote" in first.stdout and "train with --set data.store=" in first.stdout
  before = files_of(out)
  again = cli(f"--store={out}", f"--train_files={corpus}", "--workers=0")
  assert again.returncode == 1 and again.stderr.strip().splitlines() == [
      f"error: {out}/manifest.json exists: {out} is a finished token store and is never overwritten; choose another "
      "--store, or delete it to prepare it again"]
  assert files_of(out) == before
  verified = cli(f"--verify={out}")
  assert verified.returncode == 0 and f"{out}: ok (train: 2 documents" in verified.stdout
  damaged = cli(f"--verify={tmp_path / 'corrupt'}")
  assert damaged.returncode == 1 and damaged.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'corrupt'}/validation-00000.tokens: checksum differs from the manifest's; the file is "
      "damaged: re-copy the store or prepare it again into a new directory"]
  # The prepared splits are load_splits' (the smallest-hash document held out), and the store verifies.
  made = store.TokenStore(str(out))
  assert [made.splits[s].num_documents for s in store.SPLITS] == [2, 1]
  tok = Tokenizer.load(str(SHIPPED_TOKENIZER))
  np.testing.assert_array_equal(made.splits["validation"][0:10**6], in_memory_stream(held, tok).ids)
  assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
      "manifest.json", "train-00000.docs", "train-00000.json", "train-00000.tokens", "validation-00000.docs",
      "validation-00000.json", "validation-00000.tokens"]


def test_remote_cache_is_prepared_by_process_0_and_read_by_the_others(shipped, tok, tmp_path):
  import fsspec
  data, path, _ = shipped
  remote = data.replace(cache_dir="memory://cache")
  made = pipeline.store_path(remote, tok, process_index=0, process_count=4)
  assert made.startswith("memory://cache/")
  assert pipeline.store_path(remote, tok, process_index=3, process_count=4) == made
  first = pipeline.make_train_iterator(remote, tok, global_batch=8, process_index=3, process_count=4)
  local = pipeline.make_train_iterator(data.replace(store=path), tok, global_batch=8, process_index=3, process_count=4)
  np.testing.assert_array_equal(next(first)["tokens"], next(local)["tokens"])
  # Process 0 fails on bad input: the others get its one-line error instead of waiting.
  (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
  bad = remote.replace(train_files=(str(tmp_path / "bad.jsonl"),))
  with pytest.raises(DataError, match="no field 'text'"):
    pipeline.store_path(bad, tok, process_index=0, process_count=2)
  with pytest.raises(DataError, match=r"bad\.jsonl:1: the JSON object has no field 'text'"):
    pipeline.store_path(bad, tok, process_index=1, process_count=2)
  fsspec.filesystem("memory").rm("/cache", recursive=True)


def test_a_vocabulary_over_65536_is_stored_as_uint32(tok, tmp_path):
  class Big(Tokenizer):     # the shipped model, claiming a vocabulary that uint16 cannot hold
    vocab_size = 100_000

  big = Big(tok.serialized_model(), tok.path)
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i}: " + "words " * (50 * i)}) + "\n"
                                               for i in range(1, 6)))
  data = DataConfig(train_files=(str(tmp_path / "docs.jsonl"),), validation_fraction=0.0, seq_len=16)
  manifest = prepare.prepare(data, big, str(tmp_path / "s"), workers=0, progress=False)
  assert manifest["dtype"] == "<u4" and (tmp_path / "s" / "train-00000.tokens").stat().st_size == 4 * manifest[
      "splits"]["train"]["tokens"]
  want = in_memory_stream(sources.load_splits(data)[0], tok).ids
  got = store.TokenStore(str(tmp_path / "s"), big).splits["train"]
  np.testing.assert_array_equal(got[0:len(got)], want)
