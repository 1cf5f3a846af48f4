#!/usr/bin/env python3
"""Load client for `POST /v1/predict` (standard library only).

Subcommands:
  adapter DIR               write a PEFT-layout LoRA adapter (q_proj/v_proj, r=16, random
                            small factors, random score head) for SmolLM2-135M into DIR
  register DB ID DIR BASE   insert it into the server's SQLite `adapters` table
  load URL ADAPTER          many concurrent keep-alive clients for a bounded time; prints one
                            JSON line: requests, errors, pairs/s, tokens/s, p50/p90/p99 latency

Every 200 answer is checked (one prediction per pair, probabilities summing to 1); a non-200
or a malformed answer counts as an error. With --accept-429 a 429 (overloaded, with
Retry-After) is counted apart and is no error: the client backs off 100 ms and goes on. With
--rss-pid the resident memory of that process is sampled every second (Linux /proc).
"""

import argparse
import asyncio
import json
import random
import sqlite3
import struct
import sys
import time
import uuid

# SmolLM2-135M shapes
HIDDEN, LAYERS, KV_OUT = 576, 30, 192

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "How do I reverse a list in Python?",
    "Is a tomato a fruit?",
    "Explain recursion in one sentence.",
    "What's 17 times 23?",
    "Name three primary colors.",
    "Translate 'good morning' to Spanish.",
]
ANSWERS = [
    "Paris.",
    "The capital of France is Paris, on the Seine.",
    "Leaves drift slowly down / amber light on quiet paths / the year exhales cold.",
    "Use my_list[::-1] or my_list.reverse().",
    "Botanically yes; in the kitchen it is treated as a vegetable.",
    "A function that calls itself on a smaller problem until a base case.",
    "391.",
    "Red, yellow and blue.",
    "Buenos días.",
    "I'm not sure.",
]


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, (shape, values) in tensors.items():
        raw = struct.pack("<%df" % len(values), *values)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def make_adapter(out_dir, r=16, seed=0):
    import os

    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    t = {}
    for layer in range(LAYERS):
        for proj, out in (("q_proj", HIDDEN), ("v_proj", KV_OUT)):
            p = "base_model.model.model.layers.%d.self_attn.%s" % (layer, proj)
            t[p + ".lora_A.weight"] = ((r, HIDDEN), [rng.uniform(-0.04, 0.04) for _ in range(r * HIDDEN)])
            t[p + ".lora_B.weight"] = ((out, r), [rng.uniform(-0.01, 0.01) for _ in range(out * r)])
    t["base_model.model.score.weight"] = ((3, HIDDEN), [rng.gauss(0, 0.05) for _ in range(3 * HIDDEN)])
    write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), t)
    cfg = {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": r, "lora_alpha": 8, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["score"], "bias": "none",
        "base_model_name_or_path": "SmolLM2-135M-Instruct", "inference_mode": True,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    meta = {"labels": ["winner_model_a", "winner_model_b", "winner_tie"], "temperature": 1.0,
            "max_length": 512, "base_model": "SmolLM2-135M-Instruct", "metrics": None}
    with open(os.path.join(out_dir, "arbiter.json"), "w") as f:
        json.dump(meta, f)


def register(db, adapter_id, adapter_dir, base):
    con = sqlite3.connect(db, timeout=30)
    con.execute(
        "INSERT OR REPLACE INTO adapters (id, name, job_id, base_model, path, metrics, created_at) "
        "VALUES (?, ?, NULL, ?, ?, '{}', ?)",
        (adapter_id, adapter_id, base, adapter_dir, int(time.time() * 1000)),
    )
    con.commit()
    con.close()


async def http_post(reader, writer, host, path, body, key=None):
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n"
        % (path.encode(), host.encode(), auth, len(body)) + body
    )
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        data = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        data = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            data += await reader.readexactly(size)
            await reader.readline()
    else:
        data = b""
    return status, data


def make_pair(rng):
    a, b = rng.sample(ANSWERS, 2)
    return {"prompt": rng.choice(PROMPTS), "response_a": a, "response_b": b}


async def client(idx, host, port, adapter, pairs_per_request, deadline, out):
    rng = random.Random(idx)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < deadline:
            pairs = [make_pair(rng) for _ in range(pairs_per_request)]
            body = json.dumps({"adapter": adapter, "pairs": pairs}).encode()
            t0 = time.monotonic()
            try:
                status, data = await http_post(reader, writer, host, "/v1/predict", body, out.get("key"))
            except (ConnectionError, asyncio.IncompleteReadError, ValueError) as e:
                out["errors"].append("connection: %s" % e)
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            dt = time.monotonic() - t0
            out["statuses"][status] = out["statuses"].get(status, 0) + 1
            if status == 429 and out.get("accept_429"):
                out["rejected"] += 1
                await asyncio.sleep(0.1)
                continue
            ok = False
            if status == 200:
                try:
                    answer = json.loads(data)
                    preds = answer["predictions"]
                    out["tokens"] += answer["usage"]["tokens"]
                    ok = len(preds) == pairs_per_request and all(
                        abs(p["winner_model_a"] + p["winner_model_b"] + p["winner_tie"] - 1) < 1e-4 for p in preds
                    )
                except (ValueError, KeyError, TypeError):
                    ok = False
            if ok:
                out["latencies"].append(dt)
                out["pairs"] += pairs_per_request
            else:
                out["errors"].append("status %d: %s" % (status, data[:200]))
    finally:
        writer.close()


def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return None


async def sample_rss(pid, deadline, samples):
    start = time.monotonic()
    while time.monotonic() < deadline:
        samples.append((round(time.monotonic() - start, 1), round(rss_mb(pid), 1)))
        await asyncio.sleep(1.0)
    samples.append((round(time.monotonic() - start, 1), round(rss_mb(pid), 1)))


async def load(url, adapter, clients, seconds, pairs_per_request, label, key=None, accept_429=False, rss_pid=None):
    hostport = url.split("://", 1)[-1].rstrip("/")
    host, port = hostport.rsplit(":", 1)
    out = {"latencies": [], "errors": [], "pairs": 0, "tokens": 0, "statuses": {}, "rejected": 0,
           "key": key, "accept_429": accept_429}
    start = time.monotonic()
    deadline = start + seconds
    tasks = [client(i, host, int(port), adapter, pairs_per_request, deadline, out) for i in range(clients)]
    rss = []
    if rss_pid:
        tasks.append(sample_rss(rss_pid, deadline, rss))
    # requests still in flight at the deadline finish (bounded: 120 s more at most)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 120)
    elapsed = time.monotonic() - start
    lat = sorted(out["latencies"])
    res = {
        "mode": label,
        "clients": clients,
        "pairs_per_request": pairs_per_request,
        "seconds": round(elapsed, 2),
        "requests": len(lat),
        "errors": len(out["errors"]),
        "pairs_per_s": round(out["pairs"] / elapsed, 2),
        "tokens_per_pair": round(out["tokens"] / max(out["pairs"], 1), 1),
        "tokens_per_s": round(out["tokens"] / elapsed, 1),
        "p50_ms": round(pct(lat, 0.50) * 1000, 1) if lat else None,
        "p90_ms": round(pct(lat, 0.90) * 1000, 1) if lat else None,
        "p99_ms": round(pct(lat, 0.99) * 1000, 1) if lat else None,
    }
    res["statuses"] = {str(k): v for k, v in sorted(out["statuses"].items())}
    if accept_429:
        res["rejected_429"] = out["rejected"]
    if rss:
        values = [v for _, v in rss]
        res["rss_mb"] = {"first": values[0], "at_10s": next((v for t, v in rss if t >= 10), values[-1]),
                         "max": max(values), "last": values[-1]}
        res["rss_samples"] = rss
    if out["errors"]:
        res["first_errors"] = out["errors"][:3]
    print(json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("adapter")
    a.add_argument("dir")
    r = sub.add_parser("register")
    r.add_argument("db")
    r.add_argument("id")
    r.add_argument("dir")
    r.add_argument("base")
    lp = sub.add_parser("load")
    lp.add_argument("url")
    lp.add_argument("adapter")
    lp.add_argument("--clients", type=int, default=32)
    lp.add_argument("--seconds", type=float, default=30)
    lp.add_argument("--pairs-per-request", type=int, default=1)
    lp.add_argument("--label", default="")
    lp.add_argument("--key", default=None, help="API key sent as a bearer token")
    lp.add_argument("--accept-429", action="store_true", help="a 429 answer is expected under overload, not an error")
    lp.add_argument("--rss-pid", type=int, default=None, help="sample this process's RSS every second")
    args = ap.parse_args()
    if args.cmd == "adapter":
        make_adapter(args.dir)
    elif args.cmd == "register":
        register(args.db, args.id, args.dir, args.base)
    else:
        res = asyncio.run(load(args.url, args.adapter, args.clients, args.seconds, args.pairs_per_request, args.label,
                               key=args.key, accept_429=args.accept_429, rss_pid=args.rss_pid))
        sys.exit(1 if res["errors"] else 0)


if __name__ == "__main__":
    main()
