"""Tokenizers: SentencePiece (train one from text) or a Hugging Face `tokenizer.json` (e.g. GPT-NeoX-20B's, the
one the authors' Pile models use); `Tokenizer.load(path)` picks by file type and both offer the same interface:
encode, encode_batch, decode, vocab_size, bos/eos/pad ids, fingerprint, and pickling for grain workers.

Models trained here are BPE with `byte_fallback=True` and identity normalisation (no NFKC, whitespace
kept as is), so every string round-trips exactly: `decode(encode(s)) == s`. Special ids are explicit and
fixed: pad=0, unk=1, bos=2, eos=3, then 256 byte pieces <0x00>..<0xFF>, then the learned pieces.

Train from the command line (absl flags):

  python -m tokenformer_jax.data.tokenizer --input='data/*.jsonl.gz' --output=/tmp/bpe.model --vocab_size=2048
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

from tokenformer_jax import fileio
from tokenformer_jax.data.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# SentencePiece skips training "sentences" longer than this many bytes; documents are fed line by line.
_MAX_LINE_BYTES = 1 << 16


class Tokenizer:
  """A SentencePiece model with explicit special ids. Build it with `Tokenizer.load(path)`."""

  def __init__(self, model_proto: bytes, path: str = ""):
    self._proto = bytes(model_proto)
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except Exception as e:  # noqa: BLE001  (sentencepiece raises RuntimeError or OSError, multi-line)
      raise DataError(f"{path or 'tokenizer'}: not a SentencePiece model ({_first_line(e)}); "
                      "point DataConfig.tokenizer at a .model file") from None
    if self._sp.eos_id() < 0:
      raise DataError(f"{path or 'tokenizer'}: the SentencePiece model has no eos id; "
                      "train it with eos_id set (python -m tokenformer_jax.data.tokenizer does)")

  @classmethod
  def load(cls, path: str) -> Tokenizer | JsonTokenizer:
    """Reads a SentencePiece `.model` or a `tokenizer.json` (a JSON file) from a local path or gs://."""
    p = epath.Path(path)
    try:
      proto = p.read_bytes()
    except FileNotFoundError:
      raise DataError(f"tokenizer model {path} not found; train one with `python -m "
                      "tokenformer_jax.data.tokenizer --input=GLOB --output=PATH --vocab_size=N` "
                      "or set DataConfig.tokenizer") from None
    except IsADirectoryError:
      raise DataError(f"tokenizer model {path} is a directory; give the .model file") from None
    except ImportError as e:  # epath reaches gs:// through TensorFlow or fsspec + gcsfs
      raise DataError(f"cannot read {path}: {e}; `pip install gcsfs` to read gs:// paths") from None
    if str(path).endswith(".json") or proto.lstrip()[:1] == b"{":
      return JsonTokenizer(proto, str(path), _special_tokens_beside(p))
    return cls(proto, str(path))

  # Special ids -------------------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    """The model's pad id; a model trained without one pads with eos (padding is always masked)."""
    pad = self._sp.pad_id()
    return pad if pad >= 0 else self.eos_id

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def fingerprint(self) -> str:
    """A short hash of the serialized model: equal fingerprints mean identical tokenization."""
    return hashlib.sha256(self._proto).hexdigest()[:16]

  def serialized_model(self) -> bytes:
    return self._proto

  # Text <-> ids ------------------------------------------------------------------------------------
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos or eos."""
    return self._sp.EncodeAsIds(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.EncodeAsIds(list(texts))

  def decode(self, ids) -> str:
    """The text of `ids` (a list, or a numpy/jax array of one sequence); special ids decode to ""."""
    return self._sp.DecodeIds(np.asarray(ids, dtype=np.int64).reshape(-1).tolist())

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.IdToPiece(int(token_id))

  def __reduce__(self):  # picklable, e.g. for grain worker processes
    return (Tokenizer, (self._proto, self.path))

  def __repr__(self) -> str:
    return (f"Tokenizer({self.path or '<in memory>'}, vocab_size={self.vocab_size}, pad={self.pad_id}, "
            f"bos={self.bos_id}, eos={self.eos_id})")


# The eos token of a tokenizer.json, when no special_tokens_map.json beside it names one: GPT-NeoX's first.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


def _special_tokens_beside(path: epath.Path) -> dict[str, str]:
  """bos/eos/pad token strings from the special_tokens_map.json next to a tokenizer.json (as on the hub)."""
  beside = path.parent / "special_tokens_map.json"
  try:
    values = json.loads(beside.read_text()) if beside.exists() else {}
  except (OSError, ValueError):
    raise DataError(f"{beside} is not valid JSON; fix or remove it") from None
  out = {}
  for key in ("bos_token", "eos_token", "pad_token"):
    value = values.get(key)
    value = value.get("content") if isinstance(value, dict) else value
    if isinstance(value, str):
      out[key] = value
  return out


class JsonTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json (e.g. GPT-NeoX-20B's BPE) with the interface of `Tokenizer`.

  Special ids: eos (and bos) = the special_tokens_map.json's tokens when that file lies beside, else
  `<|endoftext|>` (GPT-NeoX's, id 0) or another common eos string; pad = eos unless a pad token is named
  (padding is always masked). Encoding adds no special tokens; decoding skips them.
  """

  def __init__(self, json_bytes: bytes, path: str = "", special: dict[str, str] | None = None):
    import tokenizers  # pylint: disable=g-import-not-at-top  (only needed for tokenizer.json files)
    self._json = bytes(json_bytes)
    self.path = path
    self._special = dict(special or {})
    where = path or "tokenizer.json"
    try:
      self._tok = tokenizers.Tokenizer.from_str(self._json.decode("utf-8"))
    except Exception as e:  # noqa: BLE001  (tokenizers raises its own Exception type)
      raise DataError(f"{where}: not a tokenizers tokenizer.json ({_first_line(e)})") from None
    self._eos = self._id_of(self._special.get("eos_token"), where, "eos")
    self._bos = self._id_of(self._special.get("bos_token"), where, "bos") if "bos_token" in self._special else self._eos
    self._pad = self._id_of(self._special.get("pad_token"), where, "pad") if "pad_token" in self._special else self._eos

  def _id_of(self, token: str | None, where: str, what: str) -> int:
    for candidate in (token,) if token else EOS_CANDIDATES:
      token_id = self._tok.token_to_id(candidate)
      if token_id is not None:
        return token_id
    raise DataError(f"{where}: no {what} token ({token or ' / '.join(EOS_CANDIDATES)}) in its vocabulary; "
                    "put a special_tokens_map.json naming it beside the file")

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def unk_id(self) -> int:
    model_unk = getattr(self._tok.model, "unk_token", None)
    unk = self._tok.token_to_id(model_unk) if model_unk else None
    return self._eos if unk is None else unk

  @property
  def fingerprint(self) -> str:
    """A short hash of the tokenizer.json and the special ids chosen: equal means identical tokenization."""
    special = json.dumps([self._eos, self._bos, self._pad]).encode()
    return hashlib.sha256(self._json + b"\0" + special).hexdigest()[:16]

  def serialized_model(self) -> bytes:
    return self._json

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode(np.asarray(ids, dtype=np.int64).reshape(-1).tolist(), skip_special_tokens=True)

  def id_to_piece(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id)) or ""

  def __reduce__(self):
    return (JsonTokenizer, (self._json, self.path, self._special))

  def __repr__(self) -> str:
    return (f"JsonTokenizer({self.path or '<in memory>'}, vocab_size={self.vocab_size}, pad={self.pad_id}, "
            f"bos={self.bos_id}, eos={self.eos_id})")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  # sentencepiece messages look like "INTERNAL: src/trainer_interface.cc(638) [cond] What went wrong."
  text = text.splitlines()[0] if text else type(e).__name__
  return re.sub(r"^[A-Z_]+: \S+\(\d+\) (\[.*?\] )?", "", text)


def _training_lines(texts: Iterable[str], counter: list[int]) -> Iterator[str]:
  for text in texts:
    if not isinstance(text, str):
      raise DataError(f"train_tokenizer expects strings, got {type(text).__name__}")
    for line in text.split("\n"):
      if line:
        counter[0] += 1
        yield line


def train_tokenizer(texts: Iterable[str], output_path: str, vocab_size: int, *, overwrite: bool = False,
                    character_coverage: float = 0.9995, max_lines: int = 0,
                    user_defined_symbols: Sequence[str] = ()) -> Tokenizer:
  """Trains a byte-fallback BPE SentencePiece model on `texts` and writes it to `output_path`.

  Documents are fed line by line (SentencePiece drops over-long "sentences"). Training is deterministic:
  one thread, no input sampling unless `max_lines` > 0 (then SentencePiece samples that many lines with
  its fixed seed). The file is written whole (fileio's atomic writer), and an existing file is left alone unless
  `overwrite=True`. Returns the loaded Tokenizer.

  Characters rarer than `character_coverage` get no piece of their own; they still round-trip as bytes.
  """
  output = epath.Path(output_path)
  if output.exists() and not overwrite:
    raise DataError(f"{output_path} already exists; pass overwrite=True (--overwrite) to replace it, "
                    "or choose another output path")
  if vocab_size <= 260:
    raise DataError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 260 ids "
                    "(4 special + 256 bytes); use at least a few hundred")
  counter = [0]
  model = io.BytesIO()
  spm.set_random_generator_seed(0)
  try:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=_training_lines(texts, counter), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        character_coverage=character_coverage,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True,
        user_defined_symbols=list(user_defined_symbols),
        max_sentence_length=_MAX_LINE_BYTES, input_sentence_size=max_lines,
        shuffle_input_sentence=max_lines > 0, num_threads=1, minloglevel=2)
  except DataError:
    raise
  except Exception as e:  # noqa: BLE001  (sentencepiece raises RuntimeError, OSError, ...)
    if counter[0] == 0:
      raise DataError("no text to train the tokenizer on: the input holds no non-empty line") from None
    raise DataError(f"SentencePiece training failed: {_first_line(e)} "
                    f"(vocab_size={vocab_size}, {counter[0]} lines); adjust vocab_size or the corpus") from None
  proto = model.getvalue()
  tokenizer = Tokenizer(proto, str(output_path))
  fileio.write_bytes(output, proto)
  return tokenizer


# Command line ------------------------------------------------------------------------------------------
def main(argv: Sequence[str]) -> None:
  from absl import flags, logging  # pylint: disable=g-import-not-at-top

  from tokenformer_jax.data import sources  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  if epath.Path(f.output).exists() and not f.overwrite:
    raise DataError(f"{f.output} already exists; pass --overwrite to replace it, or choose another --output")
  documents = sources.read_documents(f.input, text_field=f.text_field, what="--input")
  texts = [doc.text for doc in documents]
  logging.info("training a %d-piece BPE tokenizer on %d documents (%d characters)", f.vocab_size,
               len(texts), sum(map(len, texts)))
  tokenizer = train_tokenizer(texts, f.output, f.vocab_size, overwrite=f.overwrite,
                              character_coverage=f.character_coverage, max_lines=f.max_lines)
  tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
  print(f"wrote {f.output}: {tokenizer!r}; {tokens} tokens on the training corpus "
        f"({sum(len(t.encode('utf-8')) for t in texts) / tokens:.2f} bytes per token)")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_list("input", None, "Globs of .jsonl/.jsonl.gz/.txt/.txt.gz files, local or gs:// (comma-separated).")
  flags.DEFINE_string("output", None, "Where to write the .model file (local or gs://).")
  flags.DEFINE_integer("vocab_size", None, "Number of pieces, special ids and 256 byte pieces included.")
  flags.DEFINE_string("text_field", "text", "The JSON field holding each document's text.")
  flags.DEFINE_boolean("overwrite", False, "Replace an existing output file.")
  flags.DEFINE_float("character_coverage", 0.9995, "Fraction of characters that get a piece of their own.")
  flags.DEFINE_integer("max_lines", 0, "Train on a sample of this many lines (0: all).")
  flags.mark_flags_as_required(["input", "output", "vocab_size"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  from tokenformer_jax.cli.common import command  # pylint: disable=g-import-not-at-top (the shell of a main)
  _define_flags()
  app.run(command(DataError, log="tokenizer", hint="use --input, --output, --vocab_size")(main))
