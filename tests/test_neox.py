"""The authors' PyTorch (GPT-NeoX) checkpoints: torch-free reading and writing, import, export, and the
tokenizer.json tokenizer. torch is never imported (it is blocked for this whole module)."""
import collections
import json
import math
import os
import pickle
import shutil
import sys
import textwrap
import zipfile

import jax
import numpy as np
import pytest

import neox_reference  # noqa: E402
from helpers import assert_fails_with_one_line, relative_error, run_cli  # noqa: E402
from tokenformer_jax.checkpoint import RunCheckpoints, write_new_run  # noqa: E402
from tokenformer_jax.interop.convert import export_run, import_checkpoint  # noqa: E402
from tokenformer_jax.config import (SHIPPED_CORPUS, SHIPPED_TOKENIZER, DataConfig, TrainConfig, from_dict,  # noqa: E402
                                    to_dict)
from tokenformer_jax.data.tokenizer import JsonTokenizer, Tokenizer  # noqa: E402
from tokenformer_jax.interop import neox  # noqa: E402
from tokenformer_jax.interop import torch_format as tf  # noqa: E402
from tokenformer_jax.model import LanguageModel, abstract_params  # noqa: E402

EOT = "<|endoftext|>"
# The hub config.json of Haiyang-W/TokenFormer-150M, every key (issue 21): fixtures carry them all.
HUB_CONFIG_150M = {
    "architectures": ["TokenFormerForCausalLM"], "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
    "qkv_slot_num": 768, "proj_slot_num": 768, "ffn_slot_num": 3072, "seq_length": 2048,
    "max_position_embeddings": 2048, "pos_emb": "rotary", "rotary_pct": 0.25, "no_weight_tying": False,
    "norm": "layernorm_nonparam", "final_norm": "layernorm", "gpt_j_residual": False,
    "output_layer_parallelism": "column", "use_bias_in_attn_linear": False, "attention_config": [[["tokenformer"], 12]],
    "norm_activation_type": "l2_norm_gelu", "scaled_upper_triang_masked_softmax_fusion": False,
    "bias_gelu_fusion": False, "rope_fusion": False, "layernorm_fusion": False, "init_method": "normal",
    "output_layer_init_method": "wang_init", "use_cache": True, "torch_dtype": "float16",
    "transformers_version": "4.36.0"}


@pytest.fixture(scope="module", autouse=True)
def no_torch():
  """Any `import torch` in the code under test raises ImportError while these tests run."""
  saved = sys.modules.get("torch")
  sys.modules["torch"] = None
  yield
  if saved is None:
    del sys.modules["torch"]
  else:
    sys.modules["torch"] = saved


def corpus_texts():
  import gzip
  with gzip.open(SHIPPED_CORPUS, "rt", encoding="utf-8") as f:
    return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  """A byte-level BPE tokenizer.json (GPT-NeoX's kind) trained on the shipped corpus with `tokenizers`."""
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOT, "<|padding|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus_texts(), trainer)
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
  tok.save(str(path))
  return str(path)


def neox_config(layers, d, heads, qkv, proj, ffn, **changes):
  """config.json as the authors' checkpoints carry it: the 150M model's hub file, another shape."""
  config = {**HUB_CONFIG_150M, "num_layers": layers, "hidden_size": d, "num_attention_heads": heads,
            "qkv_slot_num": qkv, "proj_slot_num": proj, "ffn_slot_num": ffn, "seq_length": 32,
            "max_position_embeddings": 32, "attention_config": [[["tokenformer"], layers]]}
  config.update(changes)
  return config


def neox_state_dict(config, vocab_rows, seed=0):
  """Random float32 weights under the authors' names, in their order (scales chosen so every layer matters)."""
  rng = np.random.default_rng(seed)
  layers, d = config["num_layers"], config["hidden_size"]
  normal = lambda std, *shape: rng.normal(0, std, shape).astype(np.float32)
  sd = collections.OrderedDict()
  sd["sequential.0.word_embeddings.weight"] = normal(0.5, vocab_rows, d)
  for i in range(layers):
    for module, n in (("attention.query", config["qkv_slot_num"]), ("attention.key", config["qkv_slot_num"]),
                      ("attention.value", config["qkv_slot_num"]), ("attention.proj", config["proj_slot_num"]),
                      ("mlp", config["ffn_slot_num"])):
      sd[f"sequential.{i + 2}.{module}.key_param_tokens"] = normal(1.0, n, d)
      sd[f"sequential.{i + 2}.{module}.value_param_tokens"] = normal(0.5 / math.sqrt(n), n, d)
  sd[f"sequential.{layers + 3}.norm.weight"] = 1 + normal(0.1, d)
  sd[f"sequential.{layers + 3}.norm.bias"] = normal(0.1, d)
  return sd


def write_checkpoint(directory, config, sd, tokenizer=None):
  os.makedirs(directory, exist_ok=True)
  tf.save_state_dict(os.path.join(directory, "pytorch_model.bin"), sd)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  if tokenizer:
    with open(tokenizer, "rb") as src, open(os.path.join(directory, "tokenizer.json"), "wb") as dst:
      dst.write(src.read())
  return str(directory)


def tiny_config(**changes):
  return neox_config(2, 64, 4, 32, 24, 96, **changes)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer_json):
  """A 2-layer checkpoint in the authors' format, its vocabulary the test tokenizer's (padded to 512 rows)."""
  vocab = Tokenizer.load(tokenizer_json).vocab_size
  config = tiny_config()
  sd = neox_state_dict(config, -(-vocab // 128) * 128)
  return write_checkpoint(tmp_path_factory.mktemp("neox") / "TokenFormer-tiny", config, sd, tokenizer_json), sd


@pytest.fixture(scope="module")
def imported_run(tiny_checkpoint, tmp_path_factory):
  src, _ = tiny_checkpoint
  run = tmp_path_factory.mktemp("runs") / "imported"
  import_checkpoint(src, str(run), quiet=True)
  return str(run)


def restore(run, step=None):
  checkpoints = RunCheckpoints(run, read_only=True)
  cfg = from_dict(TrainConfig, checkpoints.read_json(step)).model
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract_params(cfg))
  return cfg, checkpoints.restore_params(abstract, step)


def logits(cfg, params, tokens):
  return np.asarray(jax.jit(LanguageModel(cfg).apply)({"params": params}, tokens))


# The torch.save format ------------------------------------------------------------------------------------
def hand_built_pickle():
  """data.pkl written opcode by opcode (not by the writer under test): an OrderedDict of four tensors, two
  sharing storage "0" (one a transposed, offset view), a float16 one and a bfloat16 one."""
  def unicode(s):
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b

  def ints(*values):
    return b"".join(b"K" + bytes([v]) for v in values)

  def tensor(name, storage_class, key, numel, offset, size, stride):
    return (unicode(name) + b"ctorch._utils\n_rebuild_tensor_v2\n" + b"((" + unicode("storage")
            + b"ctorch\n" + storage_class.encode() + b"\n" + unicode(key) + unicode("cpu") + ints(numel) + b"tQ"
            + ints(offset) + b"(" + ints(*size) + b"t(" + ints(*stride) + b"t\x89ccollections\nOrderedDict\n)R"
            + b"tR")

  return (b"\x80\x02ccollections\nOrderedDict\n)R("
          + tensor("a", "FloatStorage", "0", 12, 0, (2, 3), (3, 1))
          + tensor("a_t_offset", "FloatStorage", "0", 12, 6, (3, 2), (1, 3))
          + tensor("half", "HalfStorage", "1", 5, 1, (4,), (1,))
          + tensor("bf16", "BFloat16Storage", "2", 3, 0, (3,), (1,))
          + b"u.")


def test_reader_reads_a_hand_built_torch_zip_with_shared_strided_storages(tmp_path):
  storage0 = np.arange(12, dtype=np.float32) * 1.5
  storage1 = np.array([9, 1, 2, 3, 4], np.float16)
  storage2 = np.array([1.0, -2.0, 0.5], tf.BFLOAT16)
  path = tmp_path / "hand.bin"
  with zipfile.ZipFile(path, "w") as z:   # zipfile's defaults: no alignment; one member deflated
    z.writestr("pytorch_model/data.pkl", hand_built_pickle())
    z.writestr("pytorch_model/data/0", storage0.tobytes())
    z.writestr("pytorch_model/data/1", storage1.tobytes(), compress_type=zipfile.ZIP_DEFLATED)
    z.writestr("pytorch_model/data/2", storage2.tobytes())
    z.writestr("pytorch_model/version", "3\n")
  refs = tf.read_state_dict(path)
  assert list(refs) == ["a", "a_t_offset", "half", "bf16"]
  expected = {"a": storage0[:6].reshape(2, 3), "a_t_offset": storage0[6:].reshape(2, 3).T,
              "half": storage1[1:], "bf16": storage2}
  for name, want in expected.items():
    assert refs[name].dtype == want.dtype and refs[name].shape == want.shape
    np.testing.assert_array_equal(refs[name].read(), want)
    np.testing.assert_array_equal(refs[name].view(), want)
  assert sys.modules["torch"] is None


def test_writer_layout_is_torch_saves(tmp_path):
  sd = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16)}
  path = tmp_path / "x.bin"
  tf.save_state_dict(path, sd)
  with zipfile.ZipFile(path) as z:
    infos = z.infolist()
    assert [i.filename for i in infos] == ["archive/data.pkl", "archive/byteorder", "archive/data/0",
                                           "archive/data/1", "archive/version"]
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    assert all(tf._data_offset(str(path), i) % 64 == 0 for i in infos)
    assert z.read("archive/version") == b"3\n" and z.read("archive/byteorder") == b"little"
    data = z.read("archive/data.pkl")
  # The exact opening bytes torch.save's protocol-2 pickle of a state dict starts with.
  assert data.startswith(b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00wq\x02"
                         b"ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04"
                         b"ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x06tq\x08Q")
  # A plain unpickler (persistent ids and torch names stubbed) sees exactly torch's structure.
  class Name(tuple):   # a resolved global: (module, name); calling it records the call
    def __call__(self, *args):
      return (tuple(self), args)

  class Probe(pickle.Unpickler):
    def find_class(self, module, name):
      return collections.OrderedDict if module == "collections" else Name((module, name))

    def persistent_load(self, pid):
      return pid

  state = Probe(__import__("io").BytesIO(data)).load()
  assert type(state) is collections.OrderedDict and list(state) == ["w", "b"]
  assert state["w"] == (("torch._utils", "_rebuild_tensor_v2"),
                        (("storage", ("torch", "FloatStorage"), "0", "cpu", 6), 0, (2, 3), (3, 1), False,
                         collections.OrderedDict()))
  assert state["b"][1][0] == ("storage", ("torch", "HalfStorage"), "1", "cpu", 3)
  for name, array in sd.items():
    np.testing.assert_array_equal(tf.read_state_dict(path)[name].read(), array)


def test_safetensors_and_half_precision_files_import_the_same(tmp_path, tiny_checkpoint):
  _, sd = tiny_checkpoint
  tf.save_safetensors(tmp_path / "model.safetensors", sd)
  refs = tf.read_tensors(tmp_path / "model.safetensors")
  assert list(refs) == list(sd)
  for name, array in sd.items():
    np.testing.assert_array_equal(refs[name].read(), array)
  # float16 and bfloat16 files load as float32 of the same values
  cfg = neox.model_config(tiny_config(), embedding_rows=sd[neox.EMBEDDING].shape[0])
  for dtype in (np.float16, tf.BFLOAT16):
    tf.save_state_dict(tmp_path / "half.bin", {k: v.astype(dtype) for k, v in sd.items()})
    params = neox.load_params(tf.read_tensors(tmp_path / "half.bin"), cfg)
    np.testing.assert_array_equal(params["layers"]["ffn"]["key_param_tokens"][1],
                                  sd["sequential.3.mlp.key_param_tokens"].astype(dtype).astype(np.float32))
    np.testing.assert_array_equal(params["embedding"], sd[neox.EMBEDDING].astype(dtype).astype(np.float32))


# Import: the authors' forward, exactly ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("width", ["tiny", "900m", "1_5b"])
def test_imported_logits_equal_the_authors_forward(width, tiny_checkpoint, tmp_path):
  if width == "tiny":
    src, sd = tiny_checkpoint
    config, vocab = neox.read_config(os.path.join(src, "config.json")), Tokenizer.load(
        os.path.join(src, "tokenizer.json")).vocab_size
  else:   # the real widths and heads (head dims 80 and 96, rotary dims 20 and 24) at 2 layers, few tokens
    d = {"900m": 1280, "1_5b": 1536}[width]
    config, vocab = neox_config(2, d, 16, 64, 48, 160), 120
    sd = neox_state_dict(config, 128, seed=1)
    src = write_checkpoint(tmp_path / width, config, sd)
  refs = tf.read_tensors(os.path.join(src, "pytorch_model.bin"))
  cfg = neox.model_config(config, embedding_rows=refs[neox.EMBEDDING].shape[0], vocab_size=vocab)
  assert cfg.rotary_dims == int(cfg.head_dim * 0.25) and cfg.padded_vocab == refs[neox.EMBEDDING].shape[0]
  neox.check_tensors(refs, cfg, src)
  params = neox.load_params(refs, cfg)
  tokens = np.random.default_rng(2).integers(0, vocab, (2, 9))
  ours = logits(cfg, params, tokens)
  reference = neox_reference.forward(sd, config, tokens)
  assert relative_error(ours[..., :vocab], reference[..., :vocab]) <= 1e-5
  # The one deliberate difference: padded vocabulary ids are masked here, live in the reference.
  assert np.all(ours[..., vocab:] == np.finfo(np.float32).min) and np.all(np.isfinite(reference[..., vocab:]))
  if width == "tiny":   # the comparison is sharp: without rotary (the [batch, seq] pitfall) it fails
    no_rotary = logits(cfg.replace(positions="none"), params, tokens)
    assert relative_error(no_rotary[..., :vocab], reference[..., :vocab]) > 1e-2
  assert sys.modules["torch"] is None


@pytest.mark.parametrize("size", ["150m", "450m", "900m", "1_5b"])
def test_the_released_models_configs_import_as_the_pile_configs(size):
  """config.json of each released size → exactly experiments/paper.py's pile_* config (but its fixed scale)."""
  from experiments import paper
  layers, d, heads, attention, ffn = {"150m": (12, 768, 12, 768, 3072), "450m": (24, 1024, 16, 1024, 4096),
                                      "900m": (32, 1280, 16, 1280, 5120), "1_5b": (40, 1536, 16, 1536, 6144)}[size]
  pile = getattr(paper, f"pile_{size}")
  cfg = neox.model_config(neox_config(layers, d, heads, attention, attention, ffn, seq_length=2048),
                          embedding_rows=50304, vocab_size=50277, name=pile.name)
  assert cfg == pile.replace(norm_scale_tokens=pile.param_tokens)
  assert cfg.rotary_dims == {"150m": 16, "450m": 16, "900m": 20, "1_5b": 24}[size] and cfg.padded_vocab == 50304
  assert len(neox.tensor_layout(cfg)) == 10 * layers + 3


def test_the_150m_hub_config_imports_and_other_attention_kinds_are_refused():
  """The released file itself, every key: accepted with its shapes; a layer kind not implemented is refused."""
  from experiments import paper
  rows, vocab = 50304, 50277
  cfg = neox.model_config(HUB_CONFIG_150M, embedding_rows=rows, vocab_size=vocab, name=paper.pile_150m.name)
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.rotary_dims, cfg.max_seq_len) == (
      12, 768, 12, 64, 16, 2048)
  assert cfg.param_tokens.as_dict() == {"query": 768, "key": 768, "value": 768, "output": 768, "ffn": 3072}
  assert cfg == paper.pile_150m.replace(norm_scale_tokens=paper.pile_150m.param_tokens)
  # NeoX's other spellings of the same layers: "global", a repeat of "all", the expanded list
  for attention in ([[["global"], 12]], [[["tokenformer"], "all"]], [[["tokenformer", "global"], 6]],
                    ["tokenformer"] * 12):
    assert neox.model_config({**HUB_CONFIG_150M, "attention_config": attention}, embedding_rows=rows,
                             vocab_size=vocab, name=cfg.name) == cfg
  for attention, phrase in (
      ([[["local"], 12]], "has layers of kind local, which this model does not implement; supported: tokenformer, global"),
      ([[["tokenformer"], 6], [["sparse_fixed", "local"], 3]],
       "has layers of kind local, sparse_fixed, which this model does not implement; supported: "
       "tokenformer, global"),
      ([[["tokenformer"], 11]], "names 11 layers but num_layers=12"),
      ([["tokenformer"]], "is not NeoX's [[[kind, ...], layers], ...]")):
    with pytest.raises(neox.NeoXError) as error:
      neox.model_config({**HUB_CONFIG_150M, "attention_config": attention}, embedding_rows=rows, vocab_size=vocab)
    assert phrase in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_import_writes_a_run_with_the_fixed_live_scale_and_the_tokenizer(imported_run, tiny_checkpoint):
  src, sd = tiny_checkpoint
  cfg, params = restore(imported_run)
  assert cfg.norm_scale == "fixed" and cfg.norm_scale_tokens == cfg.param_tokens
  assert (cfg.param_tokens.query, cfg.param_tokens.output, cfg.param_tokens.ffn) == (32, 24, 96)
  assert cfg.positions == "rotary" and not cfg.logits_divide_by_sqrt_d and cfg.init == "neox"
  train_cfg = from_dict(TrainConfig, RunCheckpoints(imported_run, read_only=True).read_json())
  assert train_cfg.data.tokenizer == os.path.join(imported_run, "tokenizer.json")
  assert Tokenizer.load(train_cfg.data.tokenizer).fingerprint == Tokenizer.load(
      os.path.join(src, "tokenizer.json")).fingerprint
  np.testing.assert_array_equal(params["layers"]["output"]["key_param_tokens"][1],
                                sd["sequential.3.attention.proj.key_param_tokens"])
  np.testing.assert_array_equal(params["final_norm"]["bias"], sd["sequential.5.norm.bias"])


def test_import_then_export_reproduces_every_tensor(imported_run, tiny_checkpoint, tmp_path):
  src, sd = tiny_checkpoint
  out = export_run(imported_run, str(tmp_path / "exported"), quiet=True)
  original = tf.read_state_dict(os.path.join(src, "pytorch_model.bin"))
  exported = tf.read_state_dict(os.path.join(out, "pytorch_model.bin"))
  assert list(exported) == list(original) == list(sd)
  for name in sd:
    assert exported[name].read().tobytes() == original[name].read().tobytes(), name
  with zipfile.ZipFile(os.path.join(src, "pytorch_model.bin")) as a, zipfile.ZipFile(
      os.path.join(out, "pytorch_model.bin")) as b:
    assert a.read("archive/data.pkl") == b.read("archive/data.pkl")
  config = neox.read_config(os.path.join(out, "config.json"))
  original_config = neox.read_config(os.path.join(src, "config.json"))
  assert {k: config[k] for k in original_config} == original_config
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))


@pytest.mark.slow
def test_import_grow_with_zero_keys_keeps_the_logits(imported_run, tmp_path):
  """cli.grow accepts the imported run; the grown model (scale kept) computes the same logits."""
  experiment = tmp_path / "grow_target.py"
  experiment.write_text(textwrap.dedent(f"""
      from tokenformer_jax.checkpoint import RunCheckpoints
      from tokenformer_jax.config import ParamTokens, TrainConfig, from_dict
      imported = from_dict(TrainConfig, RunCheckpoints({imported_run!r}, read_only=True).read_json())
      grown = imported.replace(model=imported.model.replace(param_tokens=ParamTokens(40, 36, 44, 30, 120)),
                               global_batch=2)
  """))
  grown = tmp_path / "grown"
  result = run_cli("tokenformer_jax.cli.grow", f"--src={imported_run}", f"--config={experiment}:grown",
                   f"--dst={grown}", "--init=zero_keys")
  assert result.returncode == 0, result.stderr[-3000:]
  old_cfg, old_params = restore(imported_run)
  new_cfg, new_params = restore(str(grown))
  assert new_cfg.param_tokens.ffn == 120 and new_cfg.norm_scale_tokens == old_cfg.param_tokens
  tokens = np.random.default_rng(3).integers(0, old_cfg.vocab_size, (2, 12))
  before, after = logits(old_cfg, old_params, tokens), logits(new_cfg, new_params, tokens)
  vocab = old_cfg.vocab_size
  assert relative_error(after[..., :vocab], before[..., :vocab]) <= 1e-6


@pytest.mark.slow
def test_import_train_export_import_is_exact(imported_run, tmp_path):
  from tokenformer_jax.train.loop import train
  imported = from_dict(TrainConfig, RunCheckpoints(imported_run, read_only=True).read_json())
  cfg = imported.replace(data=imported.data.replace(seq_len=16, validation_fraction=0.1), steps=3,
                         global_batch=8, eval_every=3, eval_batches=1, log_every=1, checkpoint_every=3,
                         optim=imported.optim.replace(learning_rate=1e-2, warmup_steps=1))
  workdir = tmp_path / "trained"
  train(cfg, str(workdir), init_from=imported_run)
  trained_cfg, trained = restore(str(workdir))
  _, start = restore(imported_run)
  assert not np.array_equal(trained["layers"]["ffn"]["value_param_tokens"],
                            start["layers"]["ffn"]["value_param_tokens"])
  exported = export_run(str(workdir), str(tmp_path / "exported"), quiet=True)
  again = tmp_path / "reimported"
  import_checkpoint(exported, str(again), quiet=True)
  cfg_again, params_again = restore(str(again))
  assert cfg_again.param_tokens == trained_cfg.param_tokens
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(trained)[0], jax.tree.leaves(params_again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_export_refuses_a_model_the_authors_code_would_compute_differently(imported_run, tmp_path):
  cfg, _ = restore(imported_run)
  with pytest.raises(neox.NeoXError, match="norm scale is sqrt of"):
    neox.check_exportable(cfg.replace(param_tokens=cfg.param_tokens.__class__(40, 40, 40, 30, 120)))
  neox.check_exportable(cfg.replace(param_tokens=cfg.param_tokens.__class__(40, 40, 40, 30, 120)), live_scale=True)
  with pytest.raises(neox.NeoXError, match="divided by sqrt"):
    neox.check_exportable(cfg.replace(logits_divide_by_sqrt_d=True))
  with pytest.raises(neox.NeoXError, match="its normalization 'gelu' is none of the authors'"):
    neox.check_exportable(cfg.replace(normalization="gelu"))


# Bad input: one line naming it, nothing written ---------------------------------------------------------
def _drop(sd, config):
  del sd["sequential.3.mlp.value_param_tokens"]
  return "no tensor sequential.3.mlp.value_param_tokens"


def _extra(sd, config):
  sd["sequential.2.attention.dense.weight"] = np.zeros((4, 4), np.float32)
  return "has a tensor sequential.2.attention.dense.weight"


def _shape(sd, config):
  sd["sequential.2.attention.key.key_param_tokens"] = np.zeros((33, 64), np.float32)
  return "sequential.2.attention.key.key_param_tokens has shape [33, 64], expected [32, 64]"


def _no_key(sd, config):
  del config["qkv_slot_num"]
  return "config.json has no qkv_slot_num"


def _truncated(sd, config):
  return "truncated"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_drop, _extra, _shape, _no_key, _truncated])
def test_bad_checkpoints_are_refused_with_one_line_and_nothing_written(damage, tmp_path, tiny_checkpoint,
                                                                       tokenizer_json):
  _, good = tiny_checkpoint
  sd, config = collections.OrderedDict(good), tiny_config()
  phrase = damage(sd, config)
  src = write_checkpoint(tmp_path / "bad", config, sd, tokenizer_json)
  if damage is _truncated:
    path = os.path.join(src, "pytorch_model.bin")
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) * 6 // 10)
  dst = tmp_path / "runs" / "dst"
  dst.parent.mkdir()
  with pytest.raises(ValueError) as error:
    import_checkpoint(src, str(dst), quiet=True)
  assert phrase in str(error.value) and "\n" not in str(error.value)
  assert list(dst.parent.iterdir()) == []
  if damage is _drop:   # and as a user sees it
    result = run_cli("tokenformer_jax.cli.import_neox", f"--src={src}", f"--dst={dst}")
    assert_fails_with_one_line(result, phrase)
    assert list(dst.parent.iterdir()) == []


# The tokenizer.json tokenizer ------------------------------------------------------------------------------
def test_tokenizer_json_round_trips_and_has_its_own_fingerprint(tokenizer_json):
  tok = Tokenizer.load(tokenizer_json)
  assert isinstance(tok, JsonTokenizer) and tok.vocab_size == 400
  assert tok.eos_id == tok.bos_id == tok.pad_id == 0 and tok.id_to_piece(0) == EOT
  texts = [t[:2000] for t in corpus_texts()[:5]] + ["héllo wörld ✓ \t\n  spaces  ", ""]
  for text in texts:
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
  assert tok.decode(tok.encode("a") + [tok.eos_id]) == "a"   # special ids decode to nothing
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(texts[0]) == tok.encode(texts[0]) and clone.fingerprint == tok.fingerprint
  assert tok.fingerprint != Tokenizer.load(str(SHIPPED_TOKENIZER)).fingerprint
  from tokenformer_jax.config import DataConfig
  from tokenformer_jax.data.pipeline import make_eval_batches
  batch = make_eval_batches(DataConfig(tokenizer=tokenizer_json, seq_len=16, validation_fraction=0.1), tok,
                            global_batch=2, max_batches=1)[0]
  assert batch["tokens"].shape == (2, 17) and batch["tokens"].max() < tok.vocab_size


# The tokenizer of an import and of an export ----------------------------------------------------------------
@pytest.mark.slow
def test_import_refuses_a_source_without_a_tokenizer_unless_given_one(tmp_path, tiny_checkpoint, tokenizer_json):
  _, sd = tiny_checkpoint
  src = write_checkpoint(tmp_path / "TokenFormer-tiny", tiny_config(), sd)   # no tokenizer in it, as on the hub
  dst = tmp_path / "runs" / "tiny"
  elsewhere = tmp_path / "neox-20b"
  elsewhere.mkdir()
  tokenizer = str(shutil.copyfile(tokenizer_json, elsewhere / "20B_tokenizer.json"))
  (elsewhere / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|padding|>"}))
  for changes, phrase in (
      ({}, f"--src={src} holds no tokenizer.json or tokenizer.model; pass the model's tokenizer with "
           "--tokenizer=PATH"),
      ({"tokenizer": str(SHIPPED_TOKENIZER)}, "the tokenizer has 2048 tokens but the embedding only 512 rows"),
      ({"tokenizer": tokenizer, "vocab_size": 512}, f"--vocab_size=512 but {tokenizer} has 400 tokens")):
    with pytest.raises(ValueError) as error:
      import_checkpoint(src, str(dst), quiet=True, **changes)
    assert phrase in str(error.value) and "\n" not in str(error.value)
    assert not dst.parent.exists()
  # given one (as a user does), it is copied in under its kind's name, with the special tokens beside it
  result = run_cli("tokenformer_jax.cli.import_neox", f"--src={src}", f"--dst={dst}", f"--tokenizer={tokenizer}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"--set data.tokenizer={dst}/tokenizer.json " in result.stdout
  assert sorted(os.listdir(dst)) == ["checkpoints", "special_tokens_map.json", "tokenizer.json"]
  data = from_dict(TrainConfig, RunCheckpoints(str(dst), read_only=True).read_json()).data
  assert data.tokenizer == str(dst / "tokenizer.json")
  copy, original = Tokenizer.load(data.tokenizer), Tokenizer.load(tokenizer)
  assert copy.eos_id == original.eos_id == 1 and copy.fingerprint == original.fingerprint
  assert sorted(os.listdir(src)) == ["config.json", "pytorch_model.bin"]


def sentencepiece_run(path):
  """A run made here, not imported: TrainConfig's default tokenizer (the shipped SentencePiece one)."""
  cfg = neox.model_config(tiny_config(), embedding_rows=2048, vocab_size=2048, name="tiny-spm")
  rng = np.random.default_rng(5)
  params = jax.tree.map(lambda leaf: rng.normal(0, 0.5, leaf.shape).astype(np.float32), abstract_params(cfg))
  train_cfg = TrainConfig(model=cfg, data=DataConfig(seq_len=16))
  assert train_cfg.data.tokenizer == str(SHIPPED_TOKENIZER)
  write_new_run(path, params=params, config=to_dict(train_cfg))
  return str(path)


def run_tokenizer(run):
  return Tokenizer.load(from_dict(TrainConfig, RunCheckpoints(run, read_only=True).read_json()).data.tokenizer)


@pytest.mark.parametrize("kind", ["tokenizer.model", "tokenizer.json"])
def test_export_then_import_gives_the_same_tokenizer_and_logits(kind, imported_run, tmp_path):
  run = sentencepiece_run(tmp_path / "run") if kind == "tokenizer.model" else imported_run
  out = export_run(run, str(tmp_path / "exported"), quiet=True)
  assert sorted(os.listdir(out)) == sorted(["config.json", "pytorch_model.bin", kind])
  config = neox.read_config(os.path.join(out, "config.json"))
  assert [key for key in HUB_CONFIG_150M if key not in config] == []
  assert config["tokenizer_type"] == {"tokenizer.model": "SPMTokenizer", "tokenizer.json": "HFTokenizer"}[kind]
  again = str(tmp_path / "reimported")
  import_checkpoint(out, again, quiet=True)   # finds the tokenizer beside the weights
  before, after = run_tokenizer(run), run_tokenizer(again)
  assert after.path == os.path.join(again, kind)
  assert after.vocab_size == before.vocab_size == {"tokenizer.model": 2048, "tokenizer.json": 400}[kind]
  text = corpus_texts()[3][:3000] + " héllo wörld ✓"
  assert len(after.encode(text)) > 300 and after.encode(text) == before.encode(text)
  assert (after.eos_id, after.fingerprint) == (before.eos_id, before.fingerprint)
  (cfg, params), (cfg_again, params_again) = restore(run), restore(again)
  assert cfg_again == cfg.replace(name=cfg_again.name)   # so one compiled forward serves both
  apply = jax.jit(LanguageModel(cfg).apply)
  tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 12))
  ours = np.asarray(apply({"params": params}, tokens))
  assert np.ptp(ours[..., :cfg.vocab_size]) > 1
  np.testing.assert_array_equal(np.asarray(apply({"params": params_again}, tokens)), ours)
