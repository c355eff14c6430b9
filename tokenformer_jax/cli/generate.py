"""Sample text from a trained run: prefill, then one token per step with a KV cache, streamed as it comes.

  python -m tokenformer_jax.cli.generate --checkpoint=runs/demo --prompt="The Python tutorial"
  python -m tokenformer_jax.cli.generate --checkpoint=runs/demo/400 --prompts_file=prompts.txt \
      --max_new_tokens=128 --temperature=0.8 --top_p=0.95 --seed=1

One prompt streams to the terminal token by token; a file of prompts (one a line, or JSON lines with a
"prompt" or "text" field) is generated as one batch and printed prompt by prompt. Greedy unless
--temperature > 0. See tokenformer_jax/inference/decode.py for the cache and the compilation buckets.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags
from etils import epath

from tokenformer_jax import fileio
from tokenformer_jax.checkpoint import CheckpointError
from tokenformer_jax.cli import checkpoint_flags
from tokenformer_jax.cli.common import command
from tokenformer_jax.cli.config_flags import OVERRIDES, SEED
from tokenformer_jax.cli.inference_flags import JSON_OUT, TOKENIZER
from tokenformer_jax.data import DataError
from tokenformer_jax.inference import generate_text, load_model

PROMPT = flags.DEFINE_string("prompt", None, "One prompt.")
PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Prompts, one a line (.txt) or JSON lines with a "
                                   "'prompt' or 'text' field (.jsonl); generated together as one batch.")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Stop each completion after this many tokens.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; otherwise sample from softmax(logits / T).")
TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens whose probability reaches p.")
STOP = flags.DEFINE_multi_string("stop", [], "Cut a completion before this string (repeatable).")


def read_prompts(path: str) -> list[str]:
  file = epath.Path(path)
  if not file.exists():
    raise ValueError(f"--prompts_file={path} does not exist")
  lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
  if not file.name.endswith(".jsonl"):
    prompts = [line.replace("\\n", "\n") for line in lines]
  else:
    prompts = []
    for number, line in enumerate(lines, start=1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: malformed JSON ({error.msg})") from None
      text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
      if not isinstance(text, str):
        raise ValueError(f"{path}:{number}: expected an object with a 'prompt' or 'text' string")
      prompts.append(text)
  if not prompts:
    raise ValueError(f"--prompts_file={path} has no prompts; put one prompt on each line")
  return prompts


@command(CheckpointError, DataError, log="generate")
def main(argv):
  if (PROMPT.value is None) == (PROMPTS_FILE.value is None):
    raise ValueError("give exactly one of --prompt and --prompts_file")
  prompts = [PROMPT.value] if PROMPT.value is not None else read_prompts(PROMPTS_FILE.value)
  run, step = checkpoint_flags.checkpoint()
  model = load_model(run, step=step, overrides=OVERRIDES.value, tokenizer=TOKENIZER.value)
  sampling = dict(temperature=TEMPERATURE.value, top_k=TOP_K.value, top_p=TOP_P.value, seed=SEED.value)
  single = len(prompts) == 1
  if single:
    print(prompts[0], end="", flush=True)
  else:
    print(f"generating {len(prompts)} prompts together ...", file=sys.stderr, flush=True)
  printed = []

  def stream(row: int, text: str) -> None:
    printed.append(text)
    print(text, end="", flush=True)

  result = generate_text(model, prompts, max_new_tokens=MAX_NEW_TOKENS.value, stop=STOP.value,
                         on_text=stream if single else None, **sampling)
  if single:   # what streaming held back (a character still incomplete when the last token came)
    shown = "".join(printed)
    print(result.texts[0][len(shown):] if result.texts[0].startswith(shown) else "")
  else:
    for i, (prompt, text) in enumerate(zip(prompts, result.texts), start=1):
      print(f"=== {i} ===\n{prompt}{text}\n")
  new_tokens = sum(len(t) for t in result.tokens)
  print(f"{new_tokens} new tokens ({', '.join(sorted(set(result.finish)))}) | prefill {result.prefill_seconds:.2f}s "
        f"| decode {new_tokens / max(result.decode_seconds, 1e-9):.1f} tok/s (first call includes compilation)",
        file=sys.stderr)
  if JSON_OUT.value:
    out = [{"prompt": p, "completion": t, "tokens": len(k), "finish": f}
           for p, t, k, f in zip(prompts, result.texts, result.tokens, result.finish)]
    fileio.write_json(JSON_OUT.value, out)


if __name__ == "__main__":
  app.run(main)
