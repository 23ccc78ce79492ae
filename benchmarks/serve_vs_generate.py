"""`specli serve` against `specli generate`: decode speed on the same prompts and method.

For each Spec-Bench prompt (the first of each category), one `specli generate --json`
process and one greedy chat request to a running `specli serve`, in alternating order so
machine drift hits both alike.  Both report the engine's own decode tok/s (prefill
excluded): generate in its JSON stats, the server in the answer's `specli` object.  The
texts must be identical (greedy: both are the target's own output).  Writes
results.jsonl and summary.json to --out and prints the geometric-mean ratio.

    .venv/bin/python benchmarks/serve_vs_generate.py [--method draft] [--budget fixed:4]
        [-n 64] [--prompts 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from specli.prompts import load_prompts, pick

CLI = [sys.executable, "-m", "specli.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"specli serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("specli serve did not come up")


def via_generate(text: str, a: argparse.Namespace) -> tuple[str, float]:
    out = subprocess.run([*CLI, "generate", "-m", a.method, "--budget", a.budget, "-n",
                          str(a.n), "--no-history", "--json", "-p", text],
                         capture_output=True, text=True, check=True)
    obj = json.loads(out.stdout)
    return obj["text"], obj["stats"]["decode_tok_s"]


def model_id(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def via_server(url: str, text: str, a: argparse.Namespace) -> tuple[str, float]:
    obj = post(url + "/v1/chat/completions",
               {"model": a.model, "messages": [{"role": "user", "content": text}],
                "max_tokens": a.n, "temperature": 0})
    return obj["choices"][0]["message"]["content"], obj["specli"]["decode_tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="draft")
    ap.add_argument("--budget", default="fixed:4")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=6, help="first prompt of N categories")
    ap.add_argument("--out", type=Path, default=Path("serve-vs-generate"))
    a = ap.parse_args()
    prompts = pick(load_prompts(), None, 1)[: a.prompts]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*CLI, "serve", "-m", a.method, "--budget", a.budget,
                               "--no-history", "--port", str(port)], stderr=subprocess.DEVNULL)
    rows = []
    try:
        wait_healthy(url, server)
        a.model = model_id(url)
        via_server(url, "Hello", a)  # warm-up, as generate's own load warms nothing
        for i, p in enumerate(prompts):
            order = ("generate", "serve") if i % 2 == 0 else ("serve", "generate")
            got = {}
            for who in order:
                got[who] = via_generate(p.text, a) if who == "generate" else via_server(
                    url, p.text, a)
            row = {"prompt_id": p.id, "category": p.category,
                   "generate_tok_s": got["generate"][1], "serve_tok_s": got["serve"][1],
                   "same_text": got["generate"][0] == got["serve"][0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    ratio = math.exp(sum(math.log(r["serve_tok_s"] / r["generate_tok_s"]) for r in rows)
                     / len(rows))
    summary = {"method": a.method, "budget": a.budget, "n_tokens": a.n, "prompts": len(rows),
               "serve_over_generate_decode": round(ratio, 4),
               "all_texts_identical": all(r["same_text"] for r in rows)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
