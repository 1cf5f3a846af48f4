#!/usr/bin/env python3
"""Reference values from llama.cpp (through llama-cpp-python) for Arbiter's parity tests.

Writes tests/fixtures/llama_cpp_reference.json:
  - tokenization of hard strings (add_bos=False; special=True, and special=False where the
    string holds special-token text), bos/eos ids, the GGUF's tokenizer.ggml.pre;
  - for a few prompts: token ids, the last position's next-token logits (top-50 ids + logits,
    and the logits at 200 fixed ids), the decoded top-1 token;
  - for the same prompts: the last token's final hidden state (after the final RMSNorm,
    before the output projection) from an embedding context with pooling NONE.

Usage (from the repository root, model fetched by scripts/fetch-model.sh):
    pip install -r scripts/requirements-reference.txt
    python scripts/llama_cpp_reference.py [--model PATH] [--out PATH]
"""
import argparse
import csv
import hashlib
import json
import os
import sys

import numpy as np
import llama_cpp
from llama_cpp import Llama

GGML_TYPE_F32 = 0
N_FIXED = 200
TOP_K = 50

TEMPLATE = "User prompt: {prompt}\n\nModel A :\n{response_a}\n\n--------\n\nModel B:\n{response_b}"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def arena_row_text(sample_path):
    """The template filled with the first sample row's turns (joined by a blank line), cut to
    a bounded length so the fixture stays small; a fixed literal if the sample is absent."""
    if os.path.exists(sample_path):
        csv.field_size_limit(1 << 30)
        with open(sample_path, newline="", encoding="utf-8") as f:
            row = next(csv.DictReader(f))
        turns = {k: "\n\n".join(t or "" for t in json.loads(row[k])) for k in ("prompt", "response_a", "response_b")}
        turns = {k: v[:600] for k, v in turns.items()}
        return TEMPLATE.format(**turns)
    return TEMPLATE.format(
        prompt="Is it morally right to try to have a certain percentage of females on managerial positions?",
        response_a="The question is a complex ethical issue.\n\n**Arguments in favor:**\n\n1. Correcting inequities.",
        response_b="As an AI, I don't have personal opinions, but I can outline the main arguments.",
    )


HARD_STRINGS = [
    "",
    "Hello world",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "Café naïve résumé coöperate façade",
    "Ünïcödé ÀÉÎÕÜ ß ø å",
    "日本語のテキストと中文文本",
    "한국어 문장입니다",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "emoji 😀🎉 and flags 🇫🇷🇯🇵",
    "family 👨\u200d👩\u200d👧\u200d👦 and 👩🏽\u200d💻 zwj",
    "def f(x):\n\tif x:\n\t\treturn x  # tab\n    else:\n        return None\n",
    "a  b   c    d\n\n\n\ne\r\n\r\nf \n \n",
    "\n\n\n",
    "1234567 and 3.14159 and 2024-01-01 and 1,000,000",
    "don't I'll we're they've she'd it's DON'T",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text before<|endoftext|>text after",
    "inline <|im_start|> and <|im_end|> markers",
    "Mixed: naïve 日本 😀 code `x = 1` \"quotes\" 'single' \\backslash\\",
    "URL https://example.com/path?q=1&r=2#frag and email a.b@c.de",
    "    indented\n        more indented\n\ttabbed",
]


def token_embeddings(emb, ids):
    """Per-token final hidden states of one sequence of token ids (an embedding context with
    pooling NONE), read back the way Llama.embed does, but from our own token ids."""
    emb._batch.reset()
    emb._batch.add_sequence(ids, 0, True)
    emb._ctx.kv_cache_clear()
    emb._ctx.decode(emb._batch)
    emb._batch.reset()
    n_embd = emb.n_embd()
    ptr = llama_cpp.llama_get_embeddings(emb._ctx.ctx)
    return np.ctypeslib.as_array(ptr, shape=(len(ids) * n_embd,)).reshape(len(ids), n_embd).copy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--sample", default="../shared/data/arena-sample.csv")
    ap.add_argument("--out", default="tests/fixtures/llama_cpp_reference.json")
    args = ap.parse_args()

    arena = arena_row_text(args.sample)
    strings = HARD_STRINGS + [arena]

    common = dict(n_threads=2, n_threads_batch=2, n_ctx=1024, n_batch=1024, n_ubatch=1024,
                  type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False, seed=0)
    llm = Llama(args.model, logits_all=True, **common)
    n_vocab = llm.n_vocab()

    tokenization = []
    for s in strings:
        entry = {"text": s, "ids": llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)}
        if "<|" in s:
            entry["ids_no_special"] = llm.tokenize(s.encode("utf-8"), add_bos=False, special=False)
        tokenization.append(entry)

    prompts = [
        "The capital of France is",
        "The largest planet in the solar system is",
        "Water is made of hydrogen and",
        "<|im_start|>user\nWhat is the capital of Italy?<|im_end|>\n<|im_start|>assistant\nThe capital of Italy is",
        "def fibonacci(n):\n    if n <= 1:\n        return n\n    return",
        arena,
    ]
    fixed_ids = list(range(0, n_vocab, n_vocab // N_FIXED))[:N_FIXED]

    forward = []
    for p in prompts:
        ids = llm.tokenize(p.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
        top = np.argsort(-logits, kind="stable")[:TOP_K]
        forward.append({
            "text": p,
            "ids": ids,
            "top_ids": [int(i) for i in top],
            "top_logits": [float(logits[i]) for i in top],
            "fixed_logits": [float(logits[i]) for i in fixed_ids],
            "top1_text": llm.detokenize([int(top[0])]).decode("utf-8", errors="replace"),
            "logits_mean": float(logits.mean()),
            "logits_std": float(logits.std()),
        })
    del llm

    emb = Llama(args.model, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, **common)
    hidden_ok = True
    for entry in forward:
        vecs = token_embeddings(emb, entry["ids"])
        if "<|" not in entry["text"]:
            # cross-check with the public API (which tokenizes without special tokens)
            public = np.array(emb.embed(entry["text"], normalize=False), dtype=np.float32)
            if public.shape != vecs.shape or not np.allclose(public, vecs, rtol=1e-4, atol=1e-4):
                hidden_ok = False
                print("embed() disagrees with the per-token read-back", file=sys.stderr)
        entry["last_hidden"] = [float(x) for x in vecs[-1]]
    del emb

    out = {
        "metadata": {
            "engine": "llama.cpp via llama-cpp-python",
            "llama_cpp_python_version": llama_cpp.__version__,
            "model_file": os.path.basename(args.model),
            "model_sha256": sha256(args.model),
            "n_vocab": n_vocab,
            "n_threads": 2,
            "kv_cache_type": "f32",
            "tokenize": "Llama.tokenize(text, add_bos=False, special=...)",
            "logits": "next-token logits of the last prompt position (Llama.eval, then scores[n-1]); "
                      "top_ids/top_logits: the 50 largest; fixed_logits: logits at fixed_token_ids",
            "last_hidden": "final hidden state of the last token after the final RMSNorm (output_norm), "
                           "before the output projection: llama_get_embeddings after decoding the listed ids in a "
                           "Llama(embedding=True, pooling_type=NONE) context; equal to Llama.embed(text, "
                           "normalize=False)[-1] for the prompts without special tokens (checked)" if hidden_ok
                           else "not available: the read-back disagreed with Llama.embed",
            "command": "python scripts/llama_cpp_reference.py",
        },
        "fixed_token_ids": fixed_ids,
        "tokenization": tokenization,
        "forward": forward,
    }
    meta_llm = Llama(args.model, vocab_only=True, verbose=False)
    out["tokenizer"] = {
        "pre": meta_llm.metadata.get("tokenizer.ggml.pre"),
        "model": meta_llm.metadata.get("tokenizer.ggml.model"),
        "add_bos_token": meta_llm.metadata.get("tokenizer.ggml.add_bos_token"),
        "bos_id": meta_llm.token_bos(),
        "eos_id": meta_llm.token_eos(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    for e in forward:
        print(repr(e["text"][:50]), "->", repr(e["top1_text"]))


if __name__ == "__main__":
    main()
