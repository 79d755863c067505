"""Tokenize a corpus once into ArrayRecord, so large runs read ids instead of tokenizing on the fly.

    python -m input_pipeline.prepare OUT_DIR INPUT [INPUT ...] [--format text|jsonl|parquet|array_record|hf]
        [--separator '<|endoftext|>' | --separator blank-lines] [--drop-unterminated] [--field text]
        [--tokenizer PATH] [--utf8-errors replace|strict] [--shards N] [--threads N] [--overwrite]

Writes OUT_DIR/tokens-*.array_record and OUT_DIR/index.json (see prepared.py), atomically; prints a JSON summary.
Point a run at it with `Source(OUT_DIR, format="prepared")`.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from input_pipeline.prepared import prepare_corpus
from input_pipeline.sources import BLANK_LINES, Source
from llama import cli


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m input_pipeline.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("inputs", nargs="+", help="files or globs (quote globs); for --format hf also a directory")
    p.add_argument("--format", default="text", choices=["text", "jsonl", "parquet", "array_record", "hf"])
    p.add_argument("--separator", default=None,
                   help="text: document separator, e.g. '<|endoftext|>'; 'blank-lines' splits on blank lines; "
                        "default: one document per file")
    p.add_argument("--drop-unterminated", action="store_true",
                   help="text with --separator: drop text after each file's last separator (a cut-off slice)")
    p.add_argument("--field", default="text", help="jsonl/parquet/hf: the text field or column")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file (Llama 3 tiktoken or SentencePiece .model); default: the Llama 3 one")
    p.add_argument("--utf8-errors", default="replace", choices=["replace", "strict"])
    p.add_argument("--shards", type=cli.number(1, integer=True), default=None,
                   help="number of output files (default: ~512 MiB each)")
    p.add_argument("--threads", type=cli.number(1, integer=True), default=4)
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is an earlier prepared corpus")
    args = p.parse_args(argv)

    from llama.tokenizer import load_tokenizer  # the CLI needs a concrete tokenizer; the library does not

    sep = BLANK_LINES if args.separator == "blank-lines" else args.separator
    src = Source(tuple(args.inputs), format=args.format, field=args.field, separator=sep,
                 drop_unterminated=args.drop_unterminated, hf_split=args.hf_split)
    index = prepare_corpus(src, load_tokenizer(args.tokenizer), args.out_dir, utf8_errors=args.utf8_errors,
                           num_shards=args.shards, num_threads=args.threads, overwrite=args.overwrite)
    print(json.dumps({k: index[k] for k in ("num_documents", "num_tokens", "shards", "stats", "fingerprint")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
