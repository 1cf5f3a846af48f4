#!/usr/bin/env python3
"""Crash drill: real training jobs, worker processes killed with SIGKILL, restarted.

One API node (`arbiter serve --no-worker`) and N worker processes (`arbiter worker`) share a
fresh data directory and SQLite file. A reference job first trains uninterrupted; then the drill
jobs (same dataset, same hyperparameters, same seed) are submitted and workers are killed with
SIGKILL at random moments, every other kill timed to land while a checkpoint directory is being
written, and each killed worker is restarted under a new id. At the end it checks:

- every job ended `succeeded` with a loadable adapter, and the adapter weights are byte-for-byte
  those of the uninterrupted reference run (resume from the last checkpoint is exact);
- no job was run by two workers at once (the event timelines of its attempts do not overlap)
  and none succeeded twice;
- every checkpoint the API lists exists and its safetensors files parse completely.

Prints a JSON report; exits non-zero when a check fails. Usage: see bench/crash_drill.sh.
"""

import argparse
import glob
import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HYPER = {
    "epochs": 2,
    "batch_size": 4,
    "max_length": 64,
    "learning_rate": 2e-4,
    "checkpoint_every_steps": 2,
    "eval_every_steps": 0,
    "seed": 7,
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, base):
        self.base = base

    def call(self, method, path, body=None, content_type="application/json"):
        data = None
        headers = {}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                raw = res.read()
                return res.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def get(self, path):
        status, body = self.call("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body

    def wait_up(self, seconds=60):
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                if self.call("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the API node did not come up")

    def all_events(self, job_id):
        events, after = [], None
        while True:
            q = f"?limit=100" + (f"&after={after}" if after else "")
            page = self.get(f"/v1/fine-tuning/jobs/{job_id}/events{q}")
            events += page["data"]
            after = page.get("next_cursor")
            if not page.get("has_more") or not after:
                return events


def safetensors_ok(path):
    """The header parses and the data section is exactly as long as the header says."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return size == 8 + n + end


def query(data_dir, sql, args=()):
    """Rows of a read-only query on the service's SQLite file (what the API does not expose)."""
    db = sqlite3.connect(f"file:{os.path.join(data_dir, 'arbiter.db')}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def lock_holder(data_dir, job_id):
    """The worker holding a job's lease."""
    rows = query(data_dir, "SELECT lock_by FROM jobs WHERE id = ?", (job_id,))
    return rows[0][0] if rows else None


def checkpointed_running_job(data_dir):
    """(job, worker, step) of a running attempt that has written a checkpoint, if any."""
    rows = query(data_dir,
                 "SELECT j.id, j.lock_by, MAX(c.step) FROM jobs j JOIN checkpoints c "
                 "ON c.job_id = j.id AND c.attempt = j.attempt WHERE j.status = 'running' "
                 "GROUP BY j.id, j.lock_by LIMIT 1")
    return rows[0] if rows else None


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


class Workers:
    def __init__(self, args, data_dir, log_dir):
        self.args, self.data_dir, self.log_dir = args, data_dir, log_dir
        self.procs = {}  # worker id -> Popen
        self.started = 0

    def start(self):
        self.started += 1
        wid = f"drill-worker-{self.started}"
        log = open(os.path.join(self.log_dir, f"{wid}.log"), "wb")
        cmd = [self.args.bin, "worker", "--data-dir", self.data_dir, "--model", self.args.model,
               "--worker-id", wid, "--lease-ms", str(self.args.lease_ms), "--heartbeat-ms", "500",
               "--poll-ms", "200"]
        self.procs[wid] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        return wid

    def kill(self, wid):
        p = self.procs.pop(wid)
        p.send_signal(signal.SIGKILL)
        p.wait()

    def stop_all(self):
        for p in self.procs.values():
            p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()


def wait_terminal(api, job_ids, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        jobs = {j: api.get(f"/v1/fine-tuning/jobs/{j}") for j in job_ids}
        if all(job["status"] in ("succeeded", "failed", "cancelled") for job in jobs.values()):
            return jobs
        time.sleep(0.5)
    raise RuntimeError(f"jobs not finished after {seconds} s: " +
                       ", ".join(f"{j}={api.get(f'/v1/fine-tuning/jobs/{j}')['status']}" for j in job_ids))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sample", required=True)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--lease-ms", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", help="keep the data directory here")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    root = args.keep or tempfile.mkdtemp(prefix="arbiter-drill-")
    os.makedirs(root, exist_ok=True)
    data_dir = os.path.join(root, "data")
    port = free_port()
    api_log = open(os.path.join(root, "api.log"), "wb")
    api_proc = subprocess.Popen(
        [args.bin, "serve", "--no-worker", "--addr", f"127.0.0.1:{port}", "--data-dir", data_dir,
         "--model", args.model, "--max-attempts", "50", "--lease-ms", str(args.lease_ms)],
        stdout=api_log, stderr=subprocess.STDOUT)
    api = Api(f"http://127.0.0.1:{port}")
    workers = Workers(args, data_dir, root)
    report = {"data_dir": data_dir, "kills": [], "checks": {}}
    failures = []
    try:
        api.wait_up()
        lines = open(args.sample, newline="").read().splitlines(keepends=True)
        csv_body = "".join(lines[: args.rows + 1]).encode()
        status, ds = api.call("POST", "/v1/datasets?name=drill.csv", csv_body, "text/csv")
        assert status == 201, (status, ds)
        job_body = {"dataset_id": ds["id"], "validation_fraction": 0.2, "hyperparameters": HYPER}

        # The reference: one worker, no kills.
        status, ref = api.call("POST", "/v1/fine-tuning/jobs", job_body)
        assert status == 201, (status, ref)
        workers.start()
        t0 = time.time()
        ref = wait_terminal(api, [ref["id"]], 600)[ref["id"]]
        report["reference_seconds"] = round(time.time() - t0, 1)
        assert ref["status"] == "succeeded", ref
        workers.stop_all()
        ref_adapter = os.path.join(data_dir, "adapters", ref["adapter_id"])
        ref_sha = sha256(os.path.join(ref_adapter, "adapter_model.safetensors"))
        report["reference"] = {"job": ref["id"], "adapter_sha256": ref_sha}

        # The drill.
        job_ids = []
        for _ in range(args.jobs):
            status, job = api.call("POST", "/v1/fine-tuning/jobs", job_body)
            assert status == 201, (status, job)
            job_ids.append(job["id"])
        for _ in range(args.workers):
            workers.start()
        t0 = time.time()
        for k in range(args.kills):
            mode = ("random", "checkpoint_write", "after_checkpoint")[k % 3]
            victim, what = None, None
            deadline = time.time() + 60
            if mode == "checkpoint_write":
                # Wait for a checkpoint directory being written, then kill its job's worker.
                while time.time() < deadline and victim is None:
                    for tmp in glob.glob(os.path.join(data_dir, "jobs", "*", "**", "step-*.tmp"), recursive=True):
                        job_id = os.path.relpath(tmp, os.path.join(data_dir, "jobs")).split(os.sep)[0]
                        holder = lock_holder(data_dir, job_id)
                        if holder in workers.procs:
                            victim, what = holder, f"while writing {os.path.basename(tmp)} of {job_id}"
                            break
                    time.sleep(0.002)
            elif mode == "after_checkpoint":
                # Wait until a running attempt has written a checkpoint, then kill mid-step.
                while time.time() < deadline and victim is None:
                    row = checkpointed_running_job(data_dir)
                    if row and row[1] in workers.procs:
                        time.sleep(rng.uniform(0.2, 1.5))
                        victim, what = row[1], f"after the checkpoint at step {row[2]} of {row[0]}"
                    else:
                        time.sleep(0.05)
            if victim is None:
                time.sleep(rng.uniform(1.0, 6.0))
                victim = rng.choice(sorted(workers.procs))
                what = "at a random moment"
            workers.kill(victim)
            report["kills"].append({"t": round(time.time() - t0, 2), "worker": victim, "when": what})
            workers.start()
        jobs = wait_terminal(api, job_ids, 1200)
        report["drill_seconds"] = round(time.time() - t0, 1)
        workers.stop_all()

        # Checks.
        per_job = {}
        for j in job_ids:
            job = jobs[j]
            events = api.all_events(j)
            spans = {}
            for e in events:
                a = e["attempt"]
                t = e["created_at"]
                lo, hi = spans.get(a, (t, t))
                spans[a] = (min(lo, t), max(hi, t))
            ordered = sorted(spans.items())
            overlap = any(ordered[i][1][1] > ordered[i + 1][1][0] for i in range(len(ordered) - 1))
            succeeded_events = sum(1 for e in events if e["type"] == "status" and e["message"].startswith("succeeded"))
            # Where each attempt started: the step after the last checkpoint of an earlier attempt.
            first_step = {}
            for e in events:
                if e["type"] == "train_step" and e.get("data") and e["attempt"] not in first_step:
                    first_step[e["attempt"]] = e["data"].get("step")
            saved = query(data_dir, "SELECT attempt, step FROM checkpoints WHERE job_id = ?", (j,))
            resumed, restarts_wrong = 0, []
            for a, s0 in sorted(first_step.items()):
                before = max((st for at, st in saved if at < a), default=0)
                if s0 != before + 1:
                    restarts_wrong.append({"attempt": a, "first_step": s0, "last_checkpoint": before})
                elif before > 0:
                    resumed += 1
            info = {"status": job["status"], "attempts": job["attempt"], "overlapping_attempts": overlap,
                    "first_step_by_attempt": first_step, "attempts_resumed_from_checkpoint": resumed,
                    "succeeded_events": succeeded_events}
            if job["status"] == "succeeded":
                adapter = os.path.join(data_dir, "adapters", job["adapter_id"])
                st = os.path.join(adapter, "adapter_model.safetensors")
                info["adapter_loadable"] = safetensors_ok(st) and os.path.exists(os.path.join(adapter, "adapter_config.json"))
                info["adapter_equals_reference"] = sha256(st) == ref_sha
            listed = len(api.get(f"/v1/fine-tuning/jobs/{j}/checkpoints")["data"])
            ckpts = query(data_dir, "SELECT step, path FROM checkpoints WHERE job_id = ?", (j,))
            bad = []
            for step, path in ckpts:
                path = path if os.path.isabs(path) else os.path.join(data_dir, path)
                files = glob.glob(os.path.join(path, "*.safetensors"))
                if not files or not all(safetensors_ok(f) for f in files):
                    bad.append(step)
            info["checkpoints"] = len(ckpts)
            info["checkpoints_listed"] = listed
            if succeeded_events != (1 if job["status"] == "succeeded" else 0):
                failures.append(f"{j}: {succeeded_events} succeeded events")
            info["corrupt_checkpoints"] = bad
            info["orphan_tmp_dirs"] = len(glob.glob(os.path.join(data_dir, "jobs", j, "**", "*.tmp"), recursive=True))
            per_job[j] = info
            if job["status"] != "succeeded":
                failures.append(f"{j} ended {job['status']}: {job.get('error')}")
            if overlap:
                failures.append(f"{j}: attempts overlap in time")
            if restarts_wrong:
                failures.append(f"{j}: attempts did not start after the last checkpoint: {restarts_wrong}")
            if job["status"] == "succeeded" and not info["adapter_loadable"]:
                failures.append(f"{j}: adapter does not load")
            if job["status"] == "succeeded" and not info["adapter_equals_reference"]:
                failures.append(f"{j}: adapter differs from the uninterrupted run")
            if bad:
                failures.append(f"{j}: corrupt checkpoints at steps {bad}")
        report["jobs"] = per_job
        if not any(i["attempts_resumed_from_checkpoint"] for i in per_job.values()):
            failures.append("no attempt resumed from a checkpoint: the drill did not exercise resume")
        report["checks"] = {
            "kills": len(report["kills"]),
            "kills_during_checkpoint_write": sum(1 for k in report["kills"] if k["when"].startswith("while")),
            "jobs": len(job_ids),
            "succeeded": sum(1 for i in per_job.values() if i["status"] == "succeeded"),
            "resumed_jobs": sum(1 for i in per_job.values() if i["attempts"] > 1),
            "attempts_resumed_from_checkpoint": sum(i["attempts_resumed_from_checkpoint"] for i in per_job.values()),
            "adapters_equal_reference": sum(1 for i in per_job.values() if i.get("adapter_equals_reference")),
            "corrupt_checkpoints": sum(len(i["corrupt_checkpoints"]) for i in per_job.values()),
            "overlapping_runs": sum(1 for i in per_job.values() if i["overlapping_attempts"]),
        }
    except Exception as e:  # report what happened so far, then fail
        failures.append(f"drill aborted: {e!r}")
    finally:
        workers.stop_all()
        api_proc.send_signal(signal.SIGTERM)
        api_proc.wait(timeout=30)
    report["failures"] = failures
    print(json.dumps(report, indent=2))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
