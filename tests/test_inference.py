"""Using a trained model: KV-cache decoding, evaluation (perplexity, bits per byte), the lm-eval adapter, the CLIs.

Numbers are checked against independent computations: the full forward pass recomputed over the whole
sequence, the trainer's own logged evaluation, log-softmax sums done here with numpy.
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import HELDOUT, REPO, local_mc_accuracy, run_main

from tokenformer_jax.config import ModelConfig, ParamTokens, load_config
from tokenformer_jax.growth import grow, grown_config
from tokenformer_jax.inference import decode, eval_stream, evaluate, load_model
from tokenformer_jax.model import LanguageModel, init_params

TINY = dict(vocab_size=61, vocab_multiple=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)


def log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def tiny_config(architecture: str, positions: str, tokens=ParamTokens(24, 20, 28, 16, 72)) -> ModelConfig:
  return ModelConfig(name=f"{architecture}-{positions}", architecture=architecture, positions=positions,
                     param_tokens=tokens if architecture == "tokenformer" else None, token_multiple=8,
                     rotary_fraction=0.5, **TINY)


def grown_tokenformer():
  """A rotary TokenFormer grown by growth.grow with random new keys, so that the new tokens change the function
  (the decode must use the grown rows, not just reproduce the small model)."""
  small = tiny_config("tokenformer", "rotary")
  big = grown_config(small, small.replace(name="grown", param_tokens=ParamTokens(50, 37, 61, 29, 150)))
  params = grow(init_params(small, jax.random.key(3)), small, big, init="random", rng=jax.random.key(4))
  return big, params


# Both architectures, both position schemes, and a grown TokenFormer: the dense baseline without positions, and a
# grown rotary TokenFormer (two models: each one costs three compilations).
@pytest.mark.slow
@pytest.mark.parametrize("case", ["transformer-none", "grown-rotary"])
def test_cache_decoding_equals_full_recomputation(case):
  if case == "grown-rotary":
    cfg, params = grown_tokenformer()
  else:
    cfg = tiny_config(*case.split("-"))
    params = init_params(cfg, jax.random.key(1))
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(4, cfg.vocab_size, n)) for n in (3, 11, 7)]   # one bucket (16), ragged
  result = decode.generate(cfg, params, prompts, max_new_tokens=6, return_logits=True)
  # Each whole sequence in one causal forward pass (right-padded into one batch): position t's logits are
  # those of the prefix up to t.
  sequences = np.zeros((len(prompts), 11 + 6), np.int32)
  for row, (prompt, new) in enumerate(zip(prompts, result.tokens)):
    sequences[row, :len(prompt) + len(new)] = prompt + new
  full = np.asarray(jax.jit(LanguageModel(cfg).apply)({"params": params}, sequences))
  for prompt, new, logits, row_logits in zip(prompts, result.tokens, result.logits, full):
    assert len(new) == 6 and logits.shape == (6, cfg.padded_vocab)
    expected = row_logits[len(prompt) - 1: len(prompt) - 1 + len(new)]
    np.testing.assert_allclose(logits[:, :cfg.vocab_size], expected[:, :cfg.vocab_size], atol=1e-5, rtol=0)
    assert list(np.argmax(expected, -1)) == new   # greedy: identical tokens
  if case != "grown-rotary":
    return
  # Other prompt lengths in the same bucket (and other sampling settings) compile nothing new.
  prefill, step = decode.decode_functions(cfg, None)
  compiled = (prefill._cache_size(), step._cache_size())
  decode.generate(cfg, params, [prompts[1][:5], prompts[0] + prompts[2], [7]], max_new_tokens=6,
                  temperature=0.8, top_k=5, top_p=0.9, seed=3)
  assert (prefill._cache_size(), step._cache_size()) == compiled == (1, 1)


def decode_step_memory(cfg: ModelConfig, batch: int, slots: int):
  """memory_analysis() of the jitted decode step for a cache of `slots` slots (compiled, never run)."""
  _, step = decode.decode_functions(cfg, None)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  cache = jax.eval_shape(lambda: decode.init_cache(cfg, batch, slots))
  rows, key = jax.ShapeDtypeStruct((batch,), jnp.int32), jax.eval_shape(lambda: jax.random.key(0))
  sampling = [jax.ShapeDtypeStruct((), dtype) for dtype in (jnp.float32, jnp.int32, jnp.float32)]
  return step.lower(params, cache, rows, rows, key, *sampling).compile().memory_analysis()


# The step must write its new rows into the donated cache in place and read the cache where it lies. What may grow
# with the slots is the attention's logits and weights, [batch, heads, slots] float32 per layer: 1/head_dim of one
# layer's keys each. The scan over layers that this replaced needed 8.4 layers' keys more at 2048 slots here (a
# second cache and more). Three layers, so that "does not scale with layers × slots" is no one-layer accident;
# batch 1 (where a write on the 4-d cache once made XLA copy it) and batch 2.
@pytest.mark.parametrize("case, batch", [("tokenformer-rotary", 1), ("transformer-none", 2)])
def test_decode_step_temp_memory_does_not_grow_with_the_cache(case, batch):
  layers = 3
  cfg = tiny_config(*case.split("-")).replace(n_layers=layers, max_seq_len=2048)
  one_layer_keys = batch * cfg.n_heads * 2048 * cfg.head_dim * 4   # bytes, float32
  small, large = (decode_step_memory(cfg, batch, slots) for slots in (128, 2048))
  assert large.temp_size_in_bytes - small.temp_size_in_bytes <= one_layer_keys / 4, (small, large)
  assert large.alias_size_in_bytes == 2 * layers * one_layer_keys   # every layer's k and v updated in place


def test_sampling_respects_top_k_top_p_and_seed():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000, np.float32))
  key = jax.random.key(0)
  draw = lambda **kw: np.asarray(decode.sample(logits, key, kw.get("t", 1.0), kw.get("k", 0), kw.get("p", 1.0)))
  assert set(draw(t=0.0)) == {0}
  assert set(draw(k=2)) == {0, 1}
  assert set(draw(p=0.7)) == {0, 1} and set(draw(p=0.85)) == {0, 1, 2}
  counts = np.bincount(draw(), minlength=4) / 2000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)
  np.testing.assert_array_equal(draw(), draw())
  assert (np.asarray(decode.sample(logits, jax.random.key(1), 1.0, 0, 1.0)) != draw()).any()


@pytest.fixture(scope="module")
def loaded(trained_run):
  return load_model(str(trained_run))


@pytest.fixture(scope="module")
def next_token_log_probs(loaded):
  """ids (at most seq_len + 1) → log p(ids[t + 1] | ids[:t + 1]) for every t, and whether each is the argmax: one
  plain causal forward pass, right-padded to seq_len (padding after a position cannot change its logits)."""
  width = loaded.config.data.seq_len
  forward = jax.jit(LanguageModel(loaded.model).apply)

  def log_probs(ids):
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(ids) - 1] = ids[:-1]
    lps = log_softmax(forward({"params": loaded.params}, tokens))[0, :len(ids) - 1]
    targets = np.asarray(ids[1:])
    return lps[np.arange(len(targets)), targets], lps.argmax(-1) == targets
  return log_probs


@pytest.mark.slow
def test_eval_equals_the_trainers_evaluation(loaded, trained_run):
  cfg = loaded.config
  logged = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
  trainer_loss = [r["eval/loss"] for r in logged if "eval/loss" in r and r["step"] == cfg.steps][-1]
  stream = eval_stream(loaded, split="validation")
  # The trainer evaluates its first eval_batches global batches; the same windows here, in other batches.
  result = evaluate(loaded, stream, batch_size=4, max_tokens=cfg.eval_batches * cfg.global_batch * cfg.data.seq_len)
  assert result["windows"] == cfg.eval_batches * cfg.global_batch
  assert result["loss"] == pytest.approx(trainer_loss, rel=1e-6)
  assert result["perplexity"] == pytest.approx(math.exp(trainer_loss), rel=1e-5)
  # Bytes counted from the target pieces, over the whole split, are the documents' UTF-8 bytes.
  from tokenformer_jax.data import sources
  from tokenformer_jax.inference.evaluate import count_bytes
  _, validation_docs = sources.load_splits(cfg.data)
  assert count_bytes(stream, stream.num_targets, loaded.tokenizer) == sum(
      len(d.text.encode("utf-8")) for d in validation_docs)


def test_bits_per_byte_by_hand(loaded, next_token_log_probs, tmp_path):
  text = "Dictionaries map keys to values.\nTuples are immutable: (1, 2) — ünïcode too, 日本."
  path = tmp_path / "small.txt"
  path.write_text(text, encoding="utf-8")
  result = evaluate(loaded, eval_stream(loaded, files=[str(path)]))
  tokenizer, seq_len = loaded.tokenizer, loaded.config.data.seq_len
  ids = [tokenizer.eos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
  assert len(ids) > seq_len + 1   # more than one window: context restarts at the boundary
  nats = 0.0
  for start in range(0, len(ids) - 1, seq_len):
    nats -= next_token_log_probs(ids[start:start + seq_len + 1])[0].sum()
  assert result["tokens"] == len(ids) - 1 and result["bytes"] == len(text.encode("utf-8"))
  assert result["bits_per_byte"] == pytest.approx(nats / (math.log(2) * len(text.encode("utf-8"))), rel=1e-5)
  assert result["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)


def test_bytes_of_a_byte_level_bpe_tokenizer_json():
  """GPT-NeoX-style tokenizer.json (byte-level BPE): bits per byte counts each piece's bytes, not its characters."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from tokenformer_jax.data import pipeline
  from tokenformer_jax.data.tokenizer import JsonTokenizer
  from tokenformer_jax.inference.evaluate import count_bytes
  texts = ["Dictionaries map keys to values.", "Tuples — ünïcode, 日本語 and   spaces\n\nnew lines"]
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  bpe.train_from_iterator(texts * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tokenizer = JsonTokenizer(bpe.to_str().encode())
  documents = texts + ["é"]
  ids = [tokenizer.eos_id] + [i for text in documents for i in tokenizer.encode(text) + [tokenizer.eos_id]]
  stream = pipeline.TokenStream(np.array(ids, np.int32), len(documents))   # the pipeline's stream layout
  assert count_bytes(stream, stream.num_targets, tokenizer) == sum(len(text.encode("utf-8")) for text in documents)


def request(*args):
  from lm_eval.api.instance import Instance
  return Instance("loglikelihood", doc={}, arguments=args, idx=0)


@pytest.mark.slow
def test_adapter_log_likelihoods_are_the_models_own_sums(loaded, next_token_log_probs):
  from tokenformer_jax.inference.lm_eval_adapter import TokenFormerLM
  lm = TokenFormerLM(model=loaded, batch_size=4)
  tokenizer = loaded.tokenizer
  pairs = [("To define a function, use the keyword", " def"), ("A list is written between square ", "brackets"),
           ("", "Hello world"), ("x" * 80, " and a context longer than max_length")]
  got = lm.loglikelihood([request(*pair) for pair in pairs])
  for (context, continuation), (log_prob, greedy) in zip(pairs, got):
    context, continuation = context.rstrip(" "), context[len(context.rstrip(" ")):] + continuation
    ids = [tokenizer.eos_id] + tokenizer.encode(context + continuation)
    n = len(ids) - 1 - (len(tokenizer.encode(context)) if context else 0)
    lps, is_argmax = next_token_log_probs(ids[-(lm.max_length + 1):])
    assert log_prob == pytest.approx(lps[-n:].sum(), rel=1e-5, abs=1e-4)
    assert greedy == bool(is_argmax[-n:].all())
  # Rolling: the text in max_length windows, context restarting at each (as the evaluation pipeline).
  text = "Tuples are immutable; lists are not. " * 8
  (rolling,) = lm.loglikelihood_rolling([request(text)])
  ids, expected = [tokenizer.eos_id] + tokenizer.encode(text), 0.0
  assert len(ids) > 2 * lm.max_length
  for start in range(0, len(ids) - 1, lm.max_length):
    expected += next_token_log_probs(ids[start:start + lm.max_length + 1])[0].sum()
  assert rolling == pytest.approx(expected, rel=1e-5)
  # generate_until: greedy text, cut at the stop string.
  (generated,) = lm.generate_until([request("The Python", {"until": ["on"], "max_gen_toks": 6})])
  full = decode.generate_text(loaded, ["The Python"], max_new_tokens=6).texts[0]
  assert generated == full.split("on")[0]


@pytest.mark.slow
def test_local_task_through_lm_eval_cli(loaded, trained_run, tmp_path, monkeypatch, capsys):
  """`python -m tokenformer_jax.cli.lm_eval --model tokenformer_jax ...` end to end on the shipped local task (its
  main, in this process); its accuracy equals the one computed here from the adapter's own log-likelihoods, and
  the one the trainer logged for the same step when it ran the task during training (eval.tasks)."""
  from tokenformer_jax.cli import lm_eval as cli
  from tokenformer_jax.inference.lm_eval_adapter import TokenFormerLM
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setattr("sys.argv", ["lm_eval", "--model", "tokenformer_jax", "--model_args",
                                   f"checkpoint={trained_run}", "--include_path", "tests/lm_eval_task", "--tasks",
                                   "tokenformer_local_mc", "--output_path", str(tmp_path / "out"), "--batch_size", "8"])
  cli.main()
  (written,) = list((tmp_path / "out").rglob("results_*.json"))
  accuracy = json.loads(written.read_text())["results"]["tokenformer_local_mc"]["acc,none"]
  assert "tokenformer_local_mc" in capsys.readouterr().out
  assert accuracy == pytest.approx(local_mc_accuracy(TokenFormerLM(model=loaded)), abs=1e-9)
  logged = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
  in_training = {r["step"]: r["task/tokenformer_local_mc/acc"] for r in logged if "task/tokenformer_local_mc/acc" in r}
  assert sorted(in_training) == [6, 12] and in_training[12] == pytest.approx(accuracy, abs=1e-9)


@pytest.mark.slow
def test_eval_cli_reports_the_trainers_loss(trained_run, trained_run_console, tmp_path, capsys, monkeypatch):
  from tokenformer_jax.cli import eval as cli
  monkeypatch.chdir(REPO)
  cfg = load_config("experiments/demo.py:test_run")
  out = tmp_path / "eval.json"
  code, stdout, stderr = run_main(cli, capsys, f"--checkpoint={trained_run}/{cfg.steps}", f"--json_out={out}",
                                  f"--max_tokens={cfg.eval_batches * cfg.global_batch * cfg.data.seq_len}")
  assert code == 0, stderr[-3000:]
  logged = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
  trainer_loss = [r["eval/loss"] for r in logged if "eval/loss" in r and r["step"] == cfg.steps][-1]
  written = json.loads(out.read_text())
  assert written["loss"] == pytest.approx(trainer_loss, rel=1e-6) and written["step"] == cfg.steps
  assert written["bits_per_byte"] == pytest.approx(written["nats"] / (math.log(2) * written["bytes"]))
  assert "eval 2/2 batches" in stderr and "bits per byte" in stdout
  # The perplexity task the trainer ran during training (eval.tasks=ppl:FILE) is cli.eval's on that file.
  code, _, stderr = run_main(cli, capsys, f"--checkpoint={trained_run}/{cfg.steps}", f"--json_out={out}",
                             f"--files={HELDOUT}")
  assert code == 0, stderr[-3000:]
  in_training = [r for r in logged if "task/heldout/loss" in r]
  assert [r["step"] for r in in_training] == [6, 12] and in_training[-1]["task/seconds"] > 0
  assert in_training[-1]["task/heldout/loss"] == pytest.approx(json.loads(out.read_text())["loss"], rel=1e-6)
  assert "tasks: heldout perplexity" in trained_run_console[1].stdout


@pytest.mark.slow
def test_generate_cli_streams_and_bad_inputs_end_in_one_line(loaded, trained_run, tmp_path, capsys):
  from tokenformer_jax.cli import generate as cli
  from tokenformer_jax.data.tokenizer import train_tokenizer
  code, stdout, stderr = run_main(cli, capsys, f"--checkpoint={trained_run}", "--prompt=The Python",
                                  "--max_new_tokens=12")
  assert code == 0, stderr[-3000:]
  expected = decode.generate_text(loaded, ["The Python"], max_new_tokens=12).texts[0]
  assert stdout == "The Python" + expected + "\n" and "new tokens" in stderr

  other = train_tokenizer(["some text to learn a few pieces from"] * 20, str(tmp_path / "other.model"), 300)
  empty = tmp_path / "empty.txt"
  empty.write_text("\n \n")
  for args, phrases in [((f"--checkpoint={tmp_path}/missing", "--prompt=hi"), ("no checkpoints at",)),
                        ((f"--checkpoint={trained_run}", "--prompt=" + "word " * 40), ("max_seq_len is 32",)),
                        ((f"--checkpoint={trained_run}", "--prompt=hi", f"--tokenizer={other.path}"),
                         ("has 300 pieces", "vocab_size=2048")),
                        ((f"--checkpoint={trained_run}", f"--prompts_file={empty}"), ("has no prompts",))]:
    code, stdout, stderr = run_main(cli, capsys, *args)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and all(p in errors[0] for p in phrases), stderr
