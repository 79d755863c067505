"""Input pipeline throughput (tokens/s delivered to the trainer), with the Llama 3 tokenizer.

    .venv/bin/python -m experiments.bench_pipeline [--corpus PATH] [--seq-len 2048] [--batch 8] [--seconds 20]

Measures, on this machine: (1) `prepare` (tokenize once into ArrayRecord), the peers (2) the tokenizer alone
and (3) reading the prepared records in order, then the pipeline with (4) on-the-fly tokenization + packing and
(5) pre-tokenized ArrayRecord + packing. Each pipeline is warmed up (first batch and thread start-up
excluded), then timed over `--seconds`; tokens = batch * seq_len per batch (padding included, but with
num_epochs=None there is none). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from input_pipeline import DataConfig, Source, make_dataset, open_prepared, prepare_corpus
from input_pipeline.sources import open_documents

DEFAULT_CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets", "text", "tinystories",
                              "tinystories_v1_train_first2MiB.txt")


def tokens_per_second(cfg: DataConfig, tok, *, seq_len: int, batch: int, seconds: float, threads: int) -> dict:
    it = make_dataset(cfg, tok, seq_len=seq_len, global_batch_size=batch, seed=0, process_index=0,
                      process_count=1)
    next(it)  # warm-up: thread pools, first reads
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        n += 1
    elapsed = time.perf_counter() - start
    it.close()
    return {"batches": n, "seconds": round(elapsed, 2), "tokens_per_s": round(n * batch * seq_len / elapsed)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--tokenizer", default=None, help="default: the Llama 3 tokenizer (llama.tokenizer)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=4)
    args = p.parse_args()

    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    machine = f"{os.cpu_count()}-core {platform.machine()} CPU"
    src = Source(args.corpus, separator="<|endoftext|>", drop_unterminated=True)
    common = {"seq_len": args.seq_len, "batch": args.batch, "seconds": args.seconds, "threads": args.threads}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        index = prepare_corpus(src, tok, os.path.join(tmp, "prepared"), num_threads=args.threads, progress=False)
        dt = time.perf_counter() - t
        print(json.dumps({"what": "prepare (tokenize to ArrayRecord)", "machine": machine,
                          "documents": index["num_documents"], "tokens": index["num_tokens"],
                          "seconds": round(dt, 2), "tokens_per_s": round(index["num_tokens"] / dt)}))
        # Peers (the limits each path approaches): the tokenizer alone, one thread, no pipeline; and reading
        # the prepared records in order, with no shuffle, packing or batching.
        docs = open_documents(src)
        t, n = time.perf_counter(), sum(len(tok.encode(docs[i], bos=True, eos=True)) for i in range(len(docs)))
        print(json.dumps({"what": "peer: tokenizer.encode alone, 1 thread", "machine": machine,
                          "tokens_per_s": round(n / (time.perf_counter() - t))}))
        prepared = open_prepared([os.path.join(tmp, "prepared")])
        t, n = time.perf_counter(), sum(len(prepared[i]) for i in range(len(prepared)))
        print(json.dumps({"what": "peer: ArrayRecord records read in order, 1 thread", "machine": machine,
                          "tokens_per_s": round(n / (time.perf_counter() - t))}))
        for what, cfg in [("on-the-fly tokenization", DataConfig(sources=(src,), num_threads=args.threads)),
                          ("pre-tokenized ArrayRecord", DataConfig(sources=(Source(os.path.join(tmp, "prepared"),
                                                                                    format="prepared"),),
                                                                   num_threads=args.threads))]:
            r = tokens_per_second(cfg, tok, **common)
            print(json.dumps({"what": what, "machine": machine, **common, **r}))
            results[what] = r
        from llama import manifest

        print("results + manifest:", manifest.write_benchmark("pipeline", results, config=vars(args),
                                                             data_files=[src.paths[0]]))


if __name__ == "__main__":
    main()
