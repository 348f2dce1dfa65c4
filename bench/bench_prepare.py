"""Benchmark (not a test): tokens/s of ``prepare`` with N workers vs a plain sentencepiece loop.

The baseline is the simplest correct thing: one process, ``sp.encode(text)`` per document over
the same documents, no I/O. ``prepare`` does more (reads the corpus, splits, writes shards,
hashes them), so the ratio is the end-to-end speedup a user sees from the worker pool.

    python bench/bench_prepare.py --corpus stdlib --workers 2
    python bench/bench_prepare.py --corpus stdlib --subset 300 --workers 1 2

A tokenizer is trained first (vocab ``--vocab-size``, 4 MB sample) unless ``--tokenizer`` is
given. ``--subset N`` keeps the first N documents (written to a JSONL file) for a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from longtrain.data.corpus import CorpusSpec, iter_texts
from longtrain.data.prepare import prepare
from longtrain.data.tokenizer import Tokenizer, train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--corpus", default="stdlib")
    ap.add_argument("--tokenizer", default=None, help="existing tokenizer dir (else train one)")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--workers", type=int, nargs="+", default=[os.cpu_count() or 1])
    ap.add_argument("--subset", type=int, default=None, help="first N documents only")
    ap.add_argument("--repeats", type=int, default=1, help="best of R timings")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        docs = list(iter_texts(CorpusSpec(args.corpus)))
        corpus = args.corpus
        if args.subset:
            docs = docs[: args.subset]
            corpus = str(Path(tmp) / "subset.jsonl")
            with open(corpus, "w") as f:
                for doc_id, text in docs:
                    f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
        tok_dir = args.tokenizer
        if tok_dir is None:
            tok_dir = str(Path(tmp) / "tok")
            train_tokenizer(docs, tok_dir, vocab_size=args.vocab_size, sample_mb=4, progress=False)
        tok = Tokenizer.load(tok_dir)
        mb = sum(len(t.encode()) for _, t in docs) / 1e6

        best_base, n_tokens = float("inf"), 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n_tokens = sum(len(tok.sp.encode(text)) for _, text in docs)
            best_base = min(best_base, time.perf_counter() - t0)
        base_tps = n_tokens / best_base
        print(f"corpus {args.corpus}: {len(docs)} docs, {mb:.1f} MB, {n_tokens} tokens")
        print(f"baseline single-process sp.encode loop: {best_base:.2f}s, {base_tps:,.0f} tok/s")

        for w in args.workers:
            best = float("inf")
            for r in range(args.repeats):
                out = Path(tmp) / f"data-w{w}-r{r}"
                t0 = time.perf_counter()
                m = prepare(CorpusSpec(corpus), tok_dir, out, workers=w, progress=False)
                best = min(best, time.perf_counter() - t0)
            assert m["tokens"] == n_tokens, (m["tokens"], n_tokens)
            tps = m["tokens"] / best
            print(
                f"prepare --workers {w}: {best:.2f}s, {tps:,.0f} tok/s, "
                f"ratio vs baseline {tps / base_tps:.2f}x"
            )


if __name__ == "__main__":
    main()
