"""The server on the GPU against the server on the CPU: the same requests to `flash-moe serve
--device cuda` and `--device cpu` on a bundled chat model, greedy, must give the same answers
(OpenAI chat completions plain and streamed, with log-probabilities, Anthropic messages, and
four requests at once). Standard library only; prints a line per check and exits 1 on any
difference.

usage: python3 tools/gpu_server_check.py --bin dist/flash-moe [--model models/tiny-qwen35moe-chat-4bit]
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

PROMPT = "Write a short note about the sea."
# The served name: the model directory's (set in main).
MODEL = [""]


def post(port, path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()


def wait_ready(port, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server on port {port} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server on port {port} did not answer in {seconds} s")


def chat(port, stream=False, logprobs=False):
    body = {
        "model": MODEL[0],
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 48,
        "temperature": 0,
        "stream": stream,
    }
    if logprobs:
        body.update(logprobs=True, top_logprobs=3)
    text = post(port, "/v1/chat/completions", body)
    if not stream:
        answer = json.loads(text)["choices"][0]
        lps = [t["logprob"] for t in (answer.get("logprobs") or {}).get("content") or []]
        return answer["message"]["content"], lps
    content = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            delta = json.loads(line[6:])["choices"][0]["delta"]
            content.append(delta.get("content") or "")
    return "".join(content), []


def messages(port):
    body = {"model": MODEL[0], "max_tokens": 48, "temperature": 0, "messages": [{"role": "user", "content": PROMPT}]}
    reply = json.loads(post(port, "/v1/messages", body))
    return "".join(b.get("text", "") for b in reply["content"]), []


def concurrent(port, n=4):
    results = [None] * n

    def one(i):
        results[i] = chat(port)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return "|".join(results), []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", default="models/tiny-qwen35moe-chat-4bit")
    ap.add_argument("--against", default="cuda", help="the device compared with the CPU")
    args = ap.parse_args()
    MODEL[0] = os.path.basename(os.path.normpath(args.model))
    servers = {}
    for role, device, port in [("cpu", "cpu", 8101), ("other", args.against, 8102)]:
        cmd = [args.bin, "serve", "--model", args.model, "--device", device, "--port", str(port)]
        servers[role] = (port, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    failed = False
    try:
        for port, proc in servers.values():
            wait_ready(port, proc)
        checks = [
            ("chat completion", lambda p: chat(p)),
            ("chat completion, streamed", lambda p: chat(p, stream=True)),
            ("chat completion with logprobs", lambda p: chat(p, logprobs=True)),
            ("Anthropic message", messages),
            ("4 chat completions at once", concurrent),
        ]
        for name, run in checks:
            (cpu, cpu_lp), (gpu, gpu_lp) = (run(servers[r][0]) for r in ("cpu", "other"))
            worst = max((abs(a - b) for a, b in zip(cpu_lp, gpu_lp)), default=0.0)
            same = cpu == gpu and len(cpu_lp) == len(gpu_lp) and worst < 1e-3 and cpu
            failed |= not same
            note = f", logprobs differ by at most {worst:.1e}" if cpu_lp else ""
            print(f"server {name}: {'same' if same else 'DIFFERS'} on cpu and {args.against} ({len(gpu)} chars{note})")
            if not same:
                print(f"  cpu: {cpu!r}\n  {args.against}: {gpu!r}")
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
