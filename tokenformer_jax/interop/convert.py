"""Whole-checkpoint conversion between the authors' GPT-NeoX files and run directories here.

`import_checkpoint(src_dir, run_dir)`: pytorch_model.bin (or model.safetensors) + config.json + the tokenizer
(tokenizer.json or a SentencePiece tokenizer.model in src_dir, or `tokenizer=`) → a params-only Orbax checkpoint
at step 0 with its TrainConfig, the tokenizer files copied beside it.
`export_run(run_dir, out_dir)`: a run's checkpoint → pytorch_model.bin + config.json + the run's tokenizer.
Both check everything before writing anything, and write to a temporary directory renamed when complete.
The command-line tools are `tokenformer_jax.cli.import_neox` and `tokenformer_jax.cli.export_neox`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import jax
from etils import epath

from tokenformer_jax import fileio, sharding
from tokenformer_jax.checkpoint import CheckpointError
from tokenformer_jax.config import DataConfig, MeshConfig, TrainConfig, count_params
from tokenformer_jax.data.tokenizer import JsonTokenizer, Tokenizer
from tokenformer_jax.interop import neox
from tokenformer_jax.interop.torch_format import read_tensors, save_state_dict
from tokenformer_jax.run import Imported, RunDir

WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
# A tokenizer's file name by kind, and NeoX's tokenizer_type of that kind.
TOKENIZER_TYPES = {"tokenizer.json": "HFTokenizer", "tokenizer.model": "SPMTokenizer"}
SPECIAL_TOKEN_FILES = ("special_tokens_map.json", "tokenizer_config.json")   # beside a tokenizer.json


def weights_file(src: str) -> str:
  for name in WEIGHT_FILES:
    if os.path.isfile(os.path.join(src, name)):
      return os.path.join(src, name)
  raise ValueError(f"--src={src} holds none of {', '.join(WEIGHT_FILES)}; point it at the downloaded model "
                   "directory")


def find_tokenizer(src: str, tokenizer: str | None = None) -> str:
  """The tokenizer of an import: `tokenizer` when given, else the tokenizer.json or tokenizer.model in `src`."""
  if tokenizer:
    if not os.path.isfile(tokenizer):
      raise ValueError(f"--tokenizer={tokenizer} is not a file; give the model's tokenizer.json or SentencePiece "
                       ".model")
    return tokenizer
  for name in TOKENIZER_TYPES:
    if os.path.isfile(os.path.join(src, name)):
      return os.path.join(src, name)
  raise ValueError(f"--src={src} holds no tokenizer.json or tokenizer.model; pass the model's tokenizer with "
                   "--tokenizer=PATH (for the released models, GPT-NeoX-20B's tokenizer.json)")


def tokenizer_name(tokenizer: Tokenizer | JsonTokenizer) -> str:
  """The file name of a tokenizer's kind: tokenizer.json (Hugging Face) or tokenizer.model (SentencePiece)."""
  return "tokenizer.json" if isinstance(tokenizer, JsonTokenizer) else "tokenizer.model"


def tokenizer_files(path: str, tokenizer: Tokenizer | JsonTokenizer) -> dict[str, str]:
  """File name in a run or export directory → file: the tokenizer `path` (loaded as `tokenizer`) under the name
  of its kind, and beside a tokenizer.json the special-token files there."""
  files = {tokenizer_name(tokenizer): path}
  if isinstance(tokenizer, JsonTokenizer):
    for name in SPECIAL_TOKEN_FILES:
      beside = epath.Path(path).parent / name
      if beside.exists():
        files[name] = str(beside)
  return files


def import_checkpoint(src: str, dst: str, *, tokenizer: str | None = None, vocab_size: int | None = None,
                      name: str | None = None, overwrite: bool = False, quiet: bool = False) -> TrainConfig:
  """Convert the checkpoint in directory `src` into the run directory `dst`; returns the run's TrainConfig.

  `tokenizer`: the model's tokenizer file (default: the tokenizer.json or tokenizer.model in `src`);
  `vocab_size`, when given, must be its vocabulary size.
  """
  started = time.time()
  log = (lambda *_: None) if quiet else print
  if not os.path.isdir(src):
    raise ValueError(f"--src={src} is not a directory")
  run = RunDir.create(dst, overwrite=overwrite, source=src)
  dst_path = epath.Path(os.path.abspath(dst))
  path = weights_file(src)
  config_json = neox.read_config(os.path.join(src, "config.json"))
  tokenizer = find_tokenizer(src, tokenizer)
  tok = Tokenizer.load(tokenizer)
  if vocab_size is not None and vocab_size != tok.vocab_size:
    raise ValueError(f"--vocab_size={vocab_size} but {tokenizer} has {tok.vocab_size} tokens; drop --vocab_size "
                     "or pass the model's own tokenizer with --tokenizer")
  vocab_size = tok.vocab_size
  tensors = read_tensors(path)
  if neox.EMBEDDING not in tensors or len(tensors[neox.EMBEDDING].shape) != 2:
    raise neox.NeoXError(f"{path} has no 2-d tensor {neox.EMBEDDING}; it is not a TokenFormer NeoX checkpoint")
  cfg = neox.model_config(config_json, embedding_rows=tensors[neox.EMBEDDING].shape[0], vocab_size=vocab_size,
                          name=name or os.path.basename(os.path.normpath(src)))
  neox.check_tensors(tensors, cfg, path)
  size = neox.count_bytes(tensors)
  log(f"importing {path}: {len(tensors)} tensors, {size / 1e9:.2f} GB, {cfg.n_layers} layers, d={cfg.d_model}, "
      f"tokens {cfg.param_tokens.as_dict()}, vocabulary {cfg.vocab_size} (padded {cfg.padded_vocab})")

  def progress(done, total, leaf):
    print(f"\r  read {done}/{total} {leaf:<40}", end="" if done < total else "\n", file=sys.stderr, flush=True)

  params = neox.load_params(tensors, cfg, progress=None if quiet else progress)
  files = tokenizer_files(tokenizer, tok)
  data = DataConfig(tokenizer=str(dst_path / tokenizer_name(tok)), seq_len=min(cfg.max_seq_len, 2048))
  train_cfg = TrainConfig(model=cfg, data=data)
  record = Imported(imported_from=os.path.abspath(path), neox_config=config_json)

  dst_path.parent.mkdir(parents=True, exist_ok=True)
  # Write about one device piece at a time: without the cap Orbax has a copy of the whole model in flight.
  largest = max(shard.data.nbytes for x in jax.tree.leaves(params) for shard in x.addressable_shards)
  with tempfile.TemporaryDirectory() as staging:   # the tokenizer files under their names in the run
    for file_name, file in files.items():
      shutil.copyfile(file, os.path.join(staging, file_name))
    run.write_checkpoint(params=params, config=train_cfg, record=record,
                         files=[os.path.join(staging, file_name) for file_name in files],
                         save_concurrent_gb=largest * 1.01 / 1e9)
  log(f"imported {cfg.name} ({count_params(cfg)['total'] / 1e6:.1f}M parameters) in {time.time() - started:.1f}s"
      f"\nrun: {dst_path}")
  return train_cfg


def export_run(src: str, dst: str, *, step: int | None = None, live_scale: bool = False, overwrite: bool = False,
               quiet: bool = False) -> str:
  """Write the run `src` (checkpoint `step`, default latest) in the authors' format to directory `dst`."""
  started = time.time()
  log = (lambda *_: None) if quiet else print
  fileio.check_destination(dst, overwrite=overwrite, source=src)
  source = RunDir(src)
  step = source.step(step)
  train_cfg = source.config(step)
  cfg = train_cfg.model
  neox.check_exportable(cfg, live_scale=live_scale)
  tokenizer = train_cfg.data.tokenizer
  if not fileio.is_remote(tokenizer) and not os.path.isfile(tokenizer):
    raise ValueError(f"the run's tokenizer {tokenizer} is missing; put it back there (export writes it beside the "
                     "weights)")
  tok = source.tokenizer(train_cfg)
  files = tokenizer_files(tokenizer, tok)
  params = source.params(cfg, sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1]), "dp", step)
  if bad := neox.padding_is_zero(params, cfg):
    raise CheckpointError(f"{bad[0]} has nonzero rows past its token count; they have no place in the "
                          "authors' format (was the checkpoint edited outside tokenformer_jax?)")
  record = source.record(step)
  config_json = neox.neox_config(cfg, base=record.neox_config if isinstance(record, Imported) else None,
                                 tokenizer_type=TOKENIZER_TYPES[tokenizer_name(tok)])
  source.close()

  dst = os.path.abspath(dst)
  temporary = fileio.temporary_directory(dst)
  try:
    save_state_dict(os.path.join(temporary, "pytorch_model.bin"), neox.export_tensors(params, cfg))
    with open(os.path.join(temporary, "config.json"), "w", encoding="utf-8") as f:
      json.dump(config_json, f, indent=2)
    for file_name, file in files.items():
      epath.Path(file).copy(os.path.join(temporary, file_name))
    fileio.commit_directory(temporary, dst)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
  log(f"exported {cfg.name} ({count_params(cfg, storage=False)['total'] / 1e6:.1f}M parameters) at step {step} "
      f"in {time.time() - started:.1f}s\nwrote {dst}/pytorch_model.bin, config.json and {', '.join(files)}")
  return dst
