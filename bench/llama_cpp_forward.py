#!/usr/bin/env python3
"""llama.cpp prompt-processing throughput on the default GGUF (the reference side of the
forward benchmark). Prints one JSON line per configuration:

    {"engine":"llama.cpp","seq_len":512,"batch":1,"tokens_per_s":...,...}

What is timed: one llama_decode of `batch` sequences of `seq_len` tokens each, submitted in a
single call (a llama_batch holding all sequences, each with its own seq_id, unified KV cache),
in an embedding context with pooling NONE: the full transformer stack and final norm for every
token, hidden states read for the last token of each sequence, no vocabulary projection (what
a sequence classifier needs). Best of `--repeats` runs after one warm-up; KV cache cleared
before every run. Token ids are seeded random ids from the vocabulary (no special tokens).
2 threads by default, f32 KV cache, n_ubatch 512 (llama.cpp's default).

Usage: python bench/llama_cpp_forward.py [--model PATH] [--threads 2] [--repeats 3]
"""
import argparse
import json
import random
import time

import llama_cpp
from llama_cpp import Llama
from llama_cpp import _internals as internals

GGML_TYPE_F32 = 0


def run(model, threads, seq_len, batch, repeats, first_normal_id):
    n_ctx = seq_len * batch
    llm = Llama(
        model,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        verbose=False,
    )
    rng = random.Random(seq_len * 1000 + batch)
    seqs = [[rng.randrange(first_normal_id, llm.n_vocab()) for _ in range(seq_len)] for _ in range(batch)]
    lbatch = internals.LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=batch, verbose=False)
    best = float("inf")
    for r in range(repeats + 1):
        lbatch.reset()
        for i, s in enumerate(seqs):
            lbatch.add_sequence(s, i, False)
        llm._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        llm._ctx.decode(lbatch)
        dt = time.perf_counter() - t0
        if r > 0:  # the first run is a warm-up
            best = min(best, dt)
    lbatch.close()
    llm.close()
    return n_ctx / best, best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-lens", default="512,1024")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    # ids below this are the model's special/added tokens (SmolLM2: 0..16); skip them
    first_normal_id = 17
    for seq_len in [int(x) for x in args.seq_lens.split(",")]:
        for batch in [int(x) for x in args.batches.split(",")]:
            tps, secs = run(args.model, args.threads, seq_len, batch, args.repeats, first_normal_id)
            print(json.dumps({
                "engine": "llama.cpp",
                "seq_len": seq_len,
                "batch": batch,
                "tokens_per_s": round(tps, 1),
                "seconds": round(secs, 3),
                "threads": args.threads,
                "mode": "one llama_decode of all sequences (embedding context, pooling none)",
                "llama_cpp_python": llama_cpp.__version__,
            }), flush=True)


if __name__ == "__main__":
    main()
