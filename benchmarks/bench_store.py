"""The token store: how fast is preparation, and are the trainer side's start-up and memory flat in store size?

  python benchmarks/bench_store.py prepare [--copies=4] [--workers=0,2] [--doc_bytes=4500]
  python benchmarks/bench_store.py read [--sizes=10e6,500e6] [--batches=500] [--modes=pread,memmap]
  python benchmarks/bench_store.py remote [--latency_ms=40] [--threads=16,64] [--batches=3]

prepare  tokenizes the shipped corpus (cut into documents of --doc_bytes, OpenWebText's average, and repeated
         --copies times as distinct documents) with the shipped tokenizer
         into a store, in-process (workers=0: one core) and with a pool; prints tokens/s per worker and the
         projected hours for OpenWebText (~9B tokens) on a 96-vCPU host (96 workers, the per-worker rate measured
         here; a pool scales with cores as long as the source keeps up).
read     writes synthetic stores (random uint16 ids, 256 MB shards) of each size directly, then for each, in a fresh
         process: start-up (open the store, build the train iterator, first batch), windows/s read through the
         grain iterator (batch 64 × 1024, one host), and peak RSS, anonymous and file-backed (mapped shard pages),
         after start-up and after --batches batches, reading local shards with os.pread (the default) and with
         np.memmap (TOKENFORMER_JAX_STORE_READ=memmap). The stores are deleted afterwards.
remote   a 10M-token store in fsspec's memory:// behind a filesystem that sleeps --latency_ms per ranged read (a
         stand-in for GCS, which this machine cannot reach): windows/s through the train iterator (batch 64 × 1024)
         with each number of reader threads (pipeline.REMOTE_THREADS), over --batches × threads batches after the
         read-ahead buffer has filled.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tokenformer_jax.config import SHIPPED_CORPUS, SHIPPED_TOKENIZER, DataConfig  # noqa: E402
from tokenformer_jax.data import prepare, store  # noqa: E402
from tokenformer_jax.data.tokenizer import Tokenizer  # noqa: E402

OPENWEBTEXT_TOKENS = 9e9


def bench_prepare(copies: int, workers_list: list[int], doc_bytes: int) -> None:
  tokenizer = Tokenizer.load(str(SHIPPED_TOKENIZER))
  with gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8") as f:
    docs = [json.loads(line)["text"] for line in f]
  if doc_bytes:   # OpenWebText's documents average ~4.5 KB; the shipped ones ~28 KB (per-document costs matter)
    docs = [d[i:i + doc_bytes] for d in docs for i in range(0, len(d), doc_bytes)]
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
      for c in range(copies):
        for i, text in enumerate(docs):
          f.write(json.dumps({"id": f"{c}-{i}", "text": text}) + "\n")
    size = os.path.getsize(corpus)
    data = DataConfig(train_files=(corpus,), validation_fraction=0.05)
    for workers in workers_list:
      out = os.path.join(tmp, f"store-{workers}")
      before_self, before_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
          resource.RUSAGE_CHILDREN)
      started = time.perf_counter()
      manifest = prepare.prepare(data, tokenizer, out, workers=workers, progress=False)
      seconds = time.perf_counter() - started
      after_self, after_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
          resource.RUSAGE_CHILDREN)
      parent_cpu = after_self.ru_utime + after_self.ru_stime - before_self.ru_utime - before_self.ru_stime
      workers_cpu = (after_children.ru_utime + after_children.ru_stime - before_children.ru_utime
                     - before_children.ru_stime)
      tokens = sum(s["tokens"] for s in manifest["splits"].values())
      line = (f"prepare {size / 1e6:.1f} MB of JSON lines ({len(docs) * copies} documents, {tokens / 1e6:.2f}M "
              f"tokens), workers={workers}: {seconds:.2f} s wall, {tokens / seconds / 1e6:.2f}M tokens/s; CPU: parent "
              f"{parent_cpu:.2f} s, workers {workers_cpu:.2f} s")
      if workers == 0:   # everything in one process: tokens per CPU-second is the per-core rate
        per_core = tokens / parent_cpu
        line += f" → {per_core / 1e6:.2f}M tokens per CPU-second"
      else:               # the parent reads, dispatches and writes: its CPU per token caps the whole pool
        per_core = tokens / workers_cpu
        cap = tokens / parent_cpu
        hours = OPENWEBTEXT_TOKENS / min(per_core * 96, cap) / 3600
        line += (f" → {per_core / 1e6:.2f}M tokens per worker CPU-second, the parent caps at {cap / 1e6:.1f}M "
                 f"tokens/s; OpenWebText (9B tokens) on 96 vCPUs ≈ {hours:.2f} h (min of 96 workers and the cap)")
      print(line, flush=True)


def write_synthetic_store(path: str, tokens: int, shard_tokens: int = 128 << 20, doc_tokens: int = 1000) -> None:
  """A store of random uint16 ids (vocabulary 2048) written directly: the manifest as prepare writes it."""
  os.makedirs(path)
  rng = np.random.default_rng(0)
  shards, left, index = [], tokens, 0
  while left > 0:
    n = min(shard_tokens, left)
    name = prepare.shard_name("train", index)
    sha = hashlib.sha256()
    with open(os.path.join(path, f"{name}.tokens"), "wb") as f:
      for start in range(0, n, 1 << 24):
        block = rng.integers(4, 2048, min(1 << 24, n - start), dtype=np.uint16)
        f.write(block.tobytes())
        sha.update(block.tobytes())
    ends = np.append(np.arange(doc_tokens, n, doc_tokens), n).astype("<i8")
    with open(os.path.join(path, f"{name}.docs"), "wb") as f:
      f.write(ends.tobytes())
    shards.append({"name": name, "tokens": n, "documents": len(ends), "sha256": sha.hexdigest(),
                   "docs_sha256": hashlib.sha256(ends.tobytes()).hexdigest()})
    left -= n
    index += 1
  tok = Tokenizer.load(str(SHIPPED_TOKENIZER))
  manifest = {"format": store.FORMAT, "dtype": "<u2", "vocab_size": 2048, "eos_id": 3, "pad_id": 0,
              "tokenizer": str(SHIPPED_TOKENIZER), "tokenizer_fingerprint": tok.fingerprint, "source": "synthetic",
              "shard_tokens": shard_tokens,
              "splits": {"train": {"tokens": tokens, "documents": sum(s["documents"] for s in shards),
                                   "shards": shards},
                         "validation": {"tokens": 0, "documents": 0, "shards": []}}}
  with open(os.path.join(path, store.MANIFEST), "w") as f:
    json.dump(manifest, f)


_READER = r"""
import resource, sys, time
t0 = time.perf_counter()
from tokenformer_jax.config import SHIPPED_TOKENIZER, DataConfig
from tokenformer_jax.data import pipeline
from tokenformer_jax.data.tokenizer import Tokenizer
t_import = time.perf_counter()
def rss():
  fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
  return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon", "RssFile")}
tok = Tokenizer.load(str(SHIPPED_TOKENIZER))
data = DataConfig(store=sys.argv[1], seq_len=1024)
it = pipeline.make_train_iterator(data, tok, global_batch=64)
next(it)
t_start = time.perf_counter()
at_start = rss()
batches = int(sys.argv[2])
t = time.perf_counter()
for _ in range(batches):
  next(it)
seconds = time.perf_counter() - t
after = rss()
print(f"{t_start - t_import:.3f} {64 * batches / seconds:.0f} {at_start['VmHWM']:.0f} {at_start['RssAnon']:.0f} "
      f"{at_start['RssFile']:.0f} {after['VmHWM']:.0f} {after['RssAnon']:.0f} {after['RssFile']:.0f}")
"""


def bench_read(sizes: list[float], batches: int, modes: list[str]) -> None:
  root = tempfile.mkdtemp(prefix="bench-store-")
  try:
    for size in sizes:
      path = os.path.join(root, f"store-{size:.0e}")
      t = time.perf_counter()
      write_synthetic_store(path, int(size))
      written = time.perf_counter() - t
      for mode in modes:
        done = subprocess.run([sys.executable, "-c", _READER, path, str(batches)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": REPO, "TOKENFORMER_JAX_STORE_READ": mode}, check=True)
        start, wps, hwm0, anon0, file0, hwm1, anon1, file1 = map(float, done.stdout.split())
        print(f"store {size / 1e6:,.0f}M tokens ({size * 2 / 1e9:.2f} GB, written in {written:.1f} s), {mode}: "
              f"start-up {start:.2f} s (open + iterator + first batch); {wps:,.0f} windows/s "
              f"({wps * 1024 / 1e6:.1f}M tokens/s); peak RSS {hwm0:.0f} MB at start (anon {anon0:.0f}, file "
              f"{file0:.0f}), {hwm1:.0f} MB after {batches} batches of 64 (anon {anon1:.0f}, file {file1:.0f})")
      shutil.rmtree(path)
  finally:
    shutil.rmtree(root, ignore_errors=True)


def bench_remote(latency_ms: float, threads_list: list[int], batches: int) -> None:
  import fsspec
  from fsspec.implementations.memory import MemoryFileSystem

  from tokenformer_jax.data import pipeline

  class SlowMemory(MemoryFileSystem):
    protocol = "slowmem"
    requests = 0

    @classmethod
    def _strip_protocol(cls, path):
      return super()._strip_protocol(path.replace("slowmem://", "memory://", 1))

    def cat_file(self, path, start=None, end=None, **kwargs):
      SlowMemory.requests += 1
      time.sleep(latency_ms / 1e3)
      return super().cat_file(path, start=start, end=end, **kwargs)

  fsspec.register_implementation("slowmem", SlowMemory, clobber=True)
  local = tempfile.mkdtemp(prefix="bench-store-")
  try:
    write_synthetic_store(os.path.join(local, "s"), int(10e6))
    fs = SlowMemory()
    for name in os.listdir(os.path.join(local, "s")):
      fs.pipe_file(f"/remote/{name}", open(os.path.join(local, "s", name), "rb").read())
    tok = Tokenizer.load(str(SHIPPED_TOKENIZER))
    for threads in threads_list:
      pipeline.REMOTE_THREADS = threads
      it = pipeline.make_train_iterator(DataConfig(store="slowmem://remote", seq_len=1024), tok, global_batch=64)
      for _ in range(threads):   # what the read-ahead buffer filled at start
        next(it)
      t = time.perf_counter()
      for _ in range(batches * threads):
        next(it)
      wps = 64 * batches * threads / (time.perf_counter() - t)
      print(f"remote store, {latency_ms:.0f} ms per ranged read, {threads} reader threads: {wps:,.0f} windows/s "
            f"({wps * 1024 / 1e6:.2f}M tokens/s; {threads / (latency_ms / 1e3):,.0f} windows/s if latency were all)",
            flush=True)
      del it
  finally:
    shutil.rmtree(local, ignore_errors=True)


def main() -> None:
  args = dict(a.removeprefix("--").split("=", 1) for a in sys.argv[2:])
  if sys.argv[1:2] == ["prepare"]:
    bench_prepare(int(args.get("copies", 4)), [int(w) for w in args.get("workers", "0,2").split(",")],
                  int(args.get("doc_bytes", 4500)))
  elif sys.argv[1:2] == ["read"]:
    bench_read([float(s) for s in args.get("sizes", "10e6,500e6").split(",")], int(args.get("batches", 500)),
               args.get("modes", "pread,memmap").split(","))
  elif sys.argv[1:2] == ["remote"]:
    bench_remote(float(args.get("latency_ms", 40)), [int(t) for t in args.get("threads", "16,64").split(",")],
                 int(args.get("batches", 3)))
  else:
    raise SystemExit(__doc__)


if __name__ == "__main__":
  main()
