"""``dylora serve`` throughput: concurrent clients against one-at-a-time generation, mixture against base.

For each model (a fresh mixture of the shipped ``tiny-python-lm``, E=4, r=16 on the MLP with non-zero
experts, and the base model itself) the same prompts are completed, greedy, ``--max_tokens`` new tokens
each:

  alone       one at a time with the model's own ``generate`` (KV cache), in this process, no server
  served c    ``dylora serve``'s app (uvicorn in a thread of this process, loopback) with c concurrent
              clients, the real ``openai`` client, for c in --clients (1, 4, 8, 16)

Each client thread sends ``--requests`` requests in turn (prompts taken round-robin). Reports requests/s,
completion tokens/s, p50 and p95 request latency, the speed-up over ``alone`` of the same model, and the
mixture's served tokens/s against the base's served the same way; also per CPU-second of this process
(client threads included), which other load on the machine does not change. Every served completion is checked
against the one-at-a-time one (same text), so the faster numbers are the same answers.

    python benchmarks/serve.py [--max_tokens 64] [--requests 16] [--clients 1,4,8,16] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dylora_moe.model import DyLoRAConfig, DyLoRAMoE  # noqa: E402
from dylora_moe.model.base import load_base_model, load_tokenizer  # noqa: E402

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n    def", "# sort a list\ndef sort_list(xs):", "x = 1",
           "for i in range(10):", "def fib(n):\n    if", "with open(path) as f:", "return", "try:\n    import",
           "def main():\n    args =", "@property\ndef", "while True:", "print(", "lambda x:", "if __name__ =="]


def make_models():
    torch.manual_seed(0)
    mixture = DyLoRAMoE("tiny-python-lm", DyLoRAConfig(num_experts=4, r=16)).eval()
    with torch.no_grad():
        for _, layer in mixture.adapted_layers():
            layer.lora_B.normal_(std=0.02)
            layer.router.weight.normal_(std=1.0 / mixture.config.router_scale)
    return {"mixture": mixture, "base": load_base_model("tiny-python-lm").eval()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def alone(model, tokenizer, prompts: list[str], max_tokens: int) -> tuple[dict, dict[str, str]]:
    texts, latencies, tokens = {}, [], 0
    start, cpu = time.perf_counter(), time.process_time()
    for prompt in prompts:
        t = time.perf_counter()
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        new = out[0, ids.input_ids.shape[1]:]
        tokens += len(new)
        texts[prompt] = tokenizer.decode(new, skip_special_tokens=True)
        latencies.append(time.perf_counter() - t)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"req/s": len(prompts) / wall, "tok/s": tokens / wall, "tok/cpu-s": tokens / cpu,
            "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95)}, texts


def served(url: str, name: str, clients: int, requests: int, max_tokens: int, expected: dict[str, str]) -> dict:
    import openai

    latencies, tokens, wrong, errors = [], [0], [], []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client_thread(c: int):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        barrier.wait()
        for r in range(requests):
            prompt = PROMPTS[(c * requests + r) % len(PROMPTS)]
            t = time.perf_counter()
            try:
                reply = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0)
            except Exception as err:  # counted and printed: a benchmark that hides failures measures nothing
                errors.append(err)
                continue
            with lock:
                latencies.append(time.perf_counter() - t)
                tokens[0] += reply.usage.completion_tokens
                if reply.choices[0].text != expected[prompt]:
                    wrong.append(prompt)

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(clients)]
    start, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if errors:
        print(f"  {len(errors)} failed requests, e.g. {errors[0]!r}", file=sys.stderr)
    return {"req/s": len(latencies) / wall, "tok/s": tokens[0] / wall, "tok/cpu-s": tokens[0] / cpu,
            "p50": percentile(latencies, 0.5),
            "p95": percentile(latencies, 0.95), "wrong": len(wrong), "failed": len(errors)}


def serve_in_thread(model, tokenizer, name: str, max_batch_size: int):
    import uvicorn

    from dylora_moe.serve.command import build

    engine, app = build(model, tokenizer, name, max_batch_size=max_batch_size, max_queue=1024)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(30)
        engine.stop(timeout=30)

    return f"http://127.0.0.1:{port}", stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16, help="requests per client (default: 16)")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each cell is their median")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for the tiny model on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    concurrency = [int(c) for c in args.clients.split(",")]
    tokenizer = load_tokenizer("tiny-python-lm")
    models = make_models()
    rows, expected, servers = {}, {}, {}
    try:
        # the two models side by side, interleaved at every step: a busy machine slows both alike
        for name, model in models.items():
            if torch.cuda.is_available():
                models[name] = model = model.to("cuda")
            alone(model, tokenizer, PROMPTS[:2], 4)  # warm up
        for name, model in models.items():
            servers[name] = serve_in_thread(model, tokenizer, name, max(concurrency))
            served(servers[name][0], name, 1, 2, 4, collections.defaultdict(str))  # warm up (texts not compared)
        for round_ in range(args.rounds):
            for name, model in models.items():
                row, expected[name] = alone(model, tokenizer, PROMPTS, args.max_tokens)
                rows.setdefault((name, "alone"), []).append(row)
            for clients in concurrency:
                for name in models:
                    row = served(servers[name][0], name, clients, args.requests, args.max_tokens, expected[name])
                    rows.setdefault((name, f"served x{clients}"), []).append(row)
                    print(f"round {round_ + 1} {name} served x{clients}: {row}", file=sys.stderr)
    finally:
        for _, stop in servers.values():
            stop()

    rows = {key: {metric: (sum(r[metric] for r in runs) if metric in ("wrong", "failed")
                           else statistics.median(r[metric] for r in runs)) for metric in runs[0]}
            for key, runs in rows.items()}
    device = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"
    print(f"\ntiny-python-lm, greedy, {args.max_tokens} new tokens per request, {args.requests} requests per client, "
          f"{device}, median of {args.rounds} interleaved rounds\n")
    print("| model | mode | requests/s | tokens/s | p50 latency | p95 latency | tokens/s vs alone | same text |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, mode), row in sorted(rows.items(), key=lambda item: item[0][0] != "mixture"):
        ratio = row["tok/s"] / rows[(name, "alone")]["tok/s"]
        same = "-" if mode == "alone" else ("yes" if not row["wrong"] and not row["failed"]
                                            else f"{row['wrong']} differ, {row['failed']} failed")
        print(f"| {name} | {mode} | {row['req/s']:.2f} | {row['tok/s']:.0f} | {row['p50'] * 1000:.0f} ms | "
              f"{row['p95'] * 1000:.0f} ms | {ratio:.2f}x | {same} |")
    print("\n| clients | mixture tokens/s | base tokens/s | base / mixture (target <= 1.15) | "
          "mixture tokens/CPU-s | base tokens/CPU-s | base / mixture per CPU-s |")
    print("|---|---|---|---|---|---|---|")
    for mode in ["alone"] + [f"served x{c}" for c in concurrency]:
        m, b = rows[("mixture", mode)], rows[("base", mode)]
        print(f"| {mode} | {m['tok/s']:.0f} | {b['tok/s']:.0f} | {b['tok/s'] / m['tok/s']:.2f} | "
              f"{m['tok/cpu-s']:.0f} | {b['tok/cpu-s']:.0f} | {b['tok/cpu-s'] / m['tok/cpu-s']:.2f} |")


if __name__ == "__main__":
    main()
