"""Load benchmark for `llava-lite serve`: start a server on 127.0.0.1 (the tiny preset unless --model names a run),
drive it with N concurrent clients, print requests/s, time to first token, latency percentiles and error rate.

Each mode runs twice - one client alone (the baseline), then N clients at once - and the ratios compare the two.
`stream` requests measure time to first token and cannot share a batch; `plain` requests can, so they show what
batching buys. Traffic goes to 127.0.0.1 only, a bounded number of requests, each with a time limit.

    python tools/bench_serve.py --clients 16 --requests 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

from llava_lite.serve.config import API_KEY_ENV, ServeConfig

ROOT = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT = 300.0
SERVER_DEFAULTS = ServeConfig(model_name="bench")


@dataclass
class Run:
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0

    @property
    def requests(self) -> int:
        return len(self.latencies) + self.errors

    @property
    def per_second(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(args.model) if args.model else tiny_run(Path(scratch) / "run")
        port = free_port()
        server = start_server(model, port, args, Path(scratch) / "server.log")
        try:
            wait_ready(server, port)
            url = f"http://127.0.0.1:{port}"
            image = image_uri()
            print(
                f"server: {model} | concurrency {args.concurrency}, queue depth {args.queue_depth}, "
                f"batches up to {args.max_batch_size} | {os.cpu_count()} CPU cores, clients in this process"
            )
            print(f"load: {args.requests} request(s) per client, {args.max_tokens} tokens per answer, one image each\n")
            for mode in args.modes:
                asyncio.run(bench(url, image, mode, 1, args.requests, args.max_tokens))  # warm-up, not reported
                baseline = asyncio.run(bench(url, image, mode, 1, args.requests, args.max_tokens))
                loaded = asyncio.run(bench(url, image, mode, args.clients, args.requests, args.max_tokens))
                report(mode, baseline, loaded)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a run folder (default: a tiny random model built here)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client (default: 4)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (default: 32)")
    parser.add_argument("--modes", nargs="+", choices=["stream", "plain"], default=["stream", "plain"])
    server = SERVER_DEFAULTS
    parser.add_argument(
        "--concurrency", type=int, default=server.concurrency, help="server: generations at once (default: %(default)s)"
    )
    parser.add_argument(
        "--queue-depth", type=int, default=server.queue_depth, help="server: requests waiting (default: %(default)s)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=server.max_batch_size, help="server: batch size (default: %(default)s)"
    )
    args = parser.parse_args()
    if min(args.clients, args.requests, args.max_tokens) < 1:
        parser.error("--clients, --requests and --max-tokens must be at least 1")
    return args


def tiny_run(folder: Path) -> Path:
    """The tiny preset with seeded random weights, its LM head untied: tied random weights answer with the
    prompt's last token (newlines, which are trimmed), so the first text would come only at the very end."""
    import torch

    from llava_lite.model.llava import LlavaLiteModel
    from llava_lite.model.presets import preset

    torch.manual_seed(0)
    config = preset("tiny", language_model={"model_config": {"tie_word_embeddings": False}})
    LlavaLiteModel.from_config(config).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "llava_lite", "serve", "--model", str(model), "--port", str(port)]
    command += ["--served-model-name", "bench", "--concurrency", str(args.concurrency)]
    command += ["--queue-depth", str(args.queue_depth), "--max-batch-size", str(args.max_batch_size)]
    command += ["--max-tokens-limit", str(args.max_tokens), "--default-max-tokens", str(args.max_tokens)]
    env = {key: value for key, value in os.environ.items() if key != API_KEY_ENV}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(server: subprocess.Popen, port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        with contextlib.suppress(httpx.HTTPError):  # not listening yet
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"the server did not start within {timeout:g} s")


def image_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


async def bench(url: str, image: str, mode: str, clients: int, requests: int, max_tokens: int) -> Run:
    run = Run(clients)
    body = {
        "model": "bench",
        "max_tokens": max_tokens,
        "stream": mode == "stream",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What?"}],
            }
        ],
    }
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one_client(client, body, requests, run) for _ in range(clients)))
        run.seconds = time.perf_counter() - start
    return run


async def one_client(client: httpx.AsyncClient, body: dict, requests: int, run: Run) -> None:
    for _ in range(requests):
        start = time.perf_counter()
        try:
            if body["stream"]:
                first, tokens = await streamed(client, body, start)
            else:
                response = await client.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                first, tokens = None, response.json()["usage"]["completion_tokens"]
        except (httpx.HTTPError, KeyError, ValueError):
            run.errors += 1
            continue
        run.latencies.append(time.perf_counter() - start)
        run.tokens += tokens
        if first is not None:
            run.first_tokens.append(first)


async def streamed(client: httpx.AsyncClient, body: dict, start: float) -> tuple[float | None, int]:
    """Time to the first piece of text, and the answer's tokens as the closing usage chunk counts them."""
    first = None
    tokens = 0
    request = {**body, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=request) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(share * 100) - 1]


def report(mode: str, baseline: Run, loaded: Run) -> None:
    print(f"== {mode} ==")
    header = "clients  requests  errors   req/s  tokens/s  ttft p50  ttft p95   lat p50   lat p95   lat p99"
    print(header)
    for run in (baseline, loaded):
        ms = [1000 * v for v in run.latencies]
        ttft = [1000 * v for v in run.first_tokens]
        ttft_cells = f"{percentile(ttft, 0.5):8.0f}  {percentile(ttft, 0.95):8.0f}" if ttft else f"{'-':>8}  {'-':>8}"
        print(
            f"{run.clients:7d}  {run.requests:8d}  {run.errors / max(run.requests, 1):6.1%}  {run.per_second:6.2f}"
            f"  {run.tokens / run.seconds:8.1f}  {ttft_cells}  {percentile(ms, 0.5):8.0f}  {percentile(ms, 0.95):8.0f}"
            f"  {percentile(ms, 0.99):8.0f}"
        )
    ratio = loaded.per_second / baseline.per_second if baseline.per_second else float("nan")
    latency = percentile(loaded.latencies, 0.5) / percentile(baseline.latencies, 0.5)
    print(f"{loaded.clients} clients vs 1: {ratio:.2f}x requests/s, {latency:.2f}x median latency (times in ms)\n")


if __name__ == "__main__":
    sys.exit(main())
