"""Throughput and latency of `llada-moe serve`, dynamic batching against `--max-batch-size 1`, in one run.

Two servers are started as `llada-moe serve` processes on a saved tiny LLaDA-MoE (random weights, hidden 64,
2 layers, 8 experts; the chat tokenizer of the tests): one batching up to `--max-batch-size` rows, one decoding a
request at a time. For 1, 4 and 16 concurrent clients (threads with httpx, each sending its share of `--requests`
chat requests one after the other) the table gives requests/s and the p50 / p95 latency, the median of `--repeats`
runs; the two servers are measured alternately in every run, so a change in the machine's load hits both. A last line
compares 8 concurrent requests against the same 8 sent one after the other, on the batching server.

    python -m benchmarks.serve
    python -m benchmarks.serve --max-tokens 64 --requests 64 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from modeling_llada_moe.apps.tiny_task import save_tiny_folder


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path, max_batch_size: int, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable, "-m", "modeling_llada_moe.apps.cli", "serve", str(folder), "--port", str(port),
        "--served-model-name", "tiny", "--max-batch-size", str(max_batch_size), "--batch-window-ms",
        str(args.batch_window_ms), "--max-new-tokens", str(args.max_tokens), "--block-length", str(args.block_length),
        "--max-queue", "1024", "--log-level", "warning",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the server did not start within 300 s")
        time.sleep(0.1)


def prompt(i: int) -> str:
    """Digit prompts of varying length, so batches are left-padded as real traffic would make them."""
    return " ".join(f"t{1 + (i * 7 + k * 3) % 10}" for k in range(2 + i % 9))


def load(url: str, clients: int, requests: int, offset: int = 0) -> tuple[float, list[float]]:
    """`requests` chat requests from `clients` threads, each sending its share one after the other: (wall seconds,
    latencies)."""
    http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients + 1))

    def one(i: int) -> float:
        body = {"model": "tiny", "messages": [{"role": "user", "content": prompt(offset + i)}]}
        start = time.perf_counter()
        response = http.post(url + "/v1/chat/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - start

    def client(k: int) -> list[float]:
        return [one(i) for i in range(k, requests, clients)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for share in pool.map(client, range(clients)) for t in share]
    wall = time.perf_counter() - start
    http.close()
    return wall, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement (split over clients)")
    parser.add_argument("--repeats", type=int, default=3, help="runs; the table shows the medians")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer canvas length")
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batching server's")
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    args = parser.parse_args(argv)

    folder = save_tiny_folder(Path(tempfile.mkdtemp(prefix="llada_moe_serve_bench_")))
    servers = {}
    try:
        for name, size in ((f"batched (max {args.max_batch_size})", args.max_batch_size), ("unbatched (max 1)", 1)):
            servers[name] = start_server(folder, size, args)
        for _, url in servers.values():
            load(url, 4, 8)  # warm-up: first forwards, connection set-up
        results = {(name, c): [] for name in servers for c in args.concurrency}
        paired = []
        for _ in range(args.repeats):
            for c in args.concurrency:
                for name, (_, url) in servers.items():
                    wall, latencies = load(url, c, args.requests)
                    results[name, c].append((args.requests / wall, percentile(latencies, 0.5),
                                             percentile(latencies, 0.95)))
            batched_url = next(iter(servers.values()))[1]
            concurrent, _ = load(batched_url, 8, 8, offset=100)
            sequential, _ = load(batched_url, 1, 8, offset=100)
            paired.append((concurrent, sequential))
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(60)

    print(f"llada-moe serve, tiny model on CPU ({args.threads} torch thread(s) per server), {args.requests} chat "
          f"requests of {args.max_tokens} tokens (blocks of {args.block_length}) per measurement, median of "
          f"{args.repeats} runs\n")
    print("| clients | server | requests/s | p50 latency (s) | p95 latency (s) | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in args.concurrency:
        base = None
        for name in reversed(list(servers)):  # unbatched first: the speed-up is against it
            rates, p50s, p95s = zip(*results[name, c])
            rate = statistics.median(rates)
            base = base or rate
            print(f"| {c} | {name} | {rate:.1f} | {statistics.median(p50s):.3f} | {statistics.median(p95s):.3f} | "
                  f"{rate / base:.2f}x |")
    concurrent, sequential = (statistics.median(values) for values in zip(*paired))
    print(f"\n8 concurrent requests: {concurrent:.2f} s; the same 8 one after the other: {sequential:.2f} s "
          f"(ratio {concurrent / sequential:.2f}; batched server)")


if __name__ == "__main__":
    main()
