"""How the server holds up under load: throughput, time to first token and inter-token latency.

    python -m llama.bench_serve --url http://127.0.0.1:8000 --clients 1,4,8,16
    python -m llama.bench_serve --shape 110M --max_batch_size 8      # starts its own server, then stops it

Each of N clients sends requests one after another (streamed completions, prompts of mixed
lengths, a fixed number of new tokens: EOS is ignored), so N requests are in flight at once.
For each N the table gives the aggregate rate of generated tokens, and the 50th and 99th
percentiles of time to first token and of the gap between tokens. With --shape or --ckpt_dir
the benchmark starts `python -m llama.serve` itself (random weights shaped like SHAPE, with the
demo model's tokenizer), so the same command measures one slot against several.
"""

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from llama.bench import random_checkpoint
from llama.cli import DEMO_MODEL_DIR, run_script
from llama.model import SHAPES

# Prompts of about 16 to 256 tokens (a word "w12" is three tokens), the lengths llama.bench's mixed
# batch has, cycled through.
PROMPT_WORDS = [5, 85, 16, 67, 32, 43, 11, 53]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """Stream one completion; when each token arrived."""
    start, arrivals, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals, "tokens": tokens}


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int, headers: dict) -> dict:
    """clients concurrent clients, each sending `requests` requests in turn."""

    async def client_loop(index: int, client: httpx.AsyncClient) -> list[dict]:
        results = []
        for i in range(requests):
            words = PROMPT_WORDS[(index * requests + i) % len(PROMPT_WORDS)]
            prompt = " ".join(f"w{(index * 7 + i * 3 + k) % 97}" for k in range(words))
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
            results.append(await one_request(client, url, body))
        return results

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, headers=headers, limits=limits) as client:
        started = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        elapsed = time.perf_counter() - started
    results = [r for rs in per_client for r in rs]
    first = [r["arrivals"][0] - r["start"] for r in results if r["arrivals"]]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    generated = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens_per_s": generated / elapsed,
        "ttft_p50_s": percentile(first, 50),
        "ttft_p99_s": percentile(first, 99),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
    }


def start_server(ckpt_dir: Path, max_batch_size: int, compile: bool, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "llama.serve", "--ckpt_dir", str(ckpt_dir), "--port", str(port),
               "--max_batch_size", str(max_batch_size), "--max_seq_len", "1024", "--max_queue", "256"]  # fmt: skip
    server = subprocess.Popen(command + (["--compile"] if compile else []), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 1800
    while True:
        if server.poll() is not None:
            raise ValueError(f"the server exited with {server.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise ValueError("the server did not get ready within 30 minutes")
        time.sleep(0.5)


def main(
    url: str | None = None,
    shape: str | None = None,
    ckpt_dir: str | None = None,
    max_batch_size: int = 8,
    compile: bool = False,
    clients: str | tuple = "1,4,8,16",
    requests: int = 4,
    max_tokens: int = 128,
    api_key: str | None = None,
    model: str | None = None,
    port: int = 8765,
    work_dir: str = "~/.cache/llama-bench",
    json_path: str | None = None,
) -> None:
    """Load a server (--url) or one this command starts (--shape or --ckpt_dir); print a table."""
    if sum(x is not None for x in (url, shape, ckpt_dir)) != 1:
        raise ValueError("give one of --url (a running server), --shape (random weights) or --ckpt_dir")
    # fire hands "1,4,8" over as a tuple, and "8" as a number.
    given = clients if isinstance(clients, tuple | list) else str(clients).split(",")
    try:
        levels = [int(c) for c in given]
    except ValueError:
        levels = [0]
    if any(level < 1 for level in levels):
        raise ValueError(f"--clients must be positive numbers separated by commas, got {clients!r}")
    server = None
    if url is None:
        if shape is not None and shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
        folder = (
            Path(ckpt_dir)
            if ckpt_dir
            else random_checkpoint(
                shape, Path(work_dir).expanduser(), torch.float32, DEMO_MODEL_DIR / "tokenizer.model"
            )
        )
        print(f"bench_serve: starting a server on {folder} with --max_batch_size {max_batch_size}", file=sys.stderr)
        server = start_server(folder, max_batch_size, compile, port)
        url = f"http://127.0.0.1:{port}"
    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        model = model or httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
        rows = []
        for level in levels:
            print(f"bench_serve: {level} client(s)", file=sys.stderr, flush=True)
            rows.append(asyncio.run(load(url, model, level, requests, max_tokens, headers)))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    print(
        f"{'clients':>8} {'requests':>9} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9}"
    )
    for r in rows:
        times = [r[k] * 1e3 for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")]
        print(
            f"{r['clients']:>8} {r['requests']:>9} {r['tokens_per_s']:>9.1f} " + " ".join(f"{t:>7.1f}ms" for t in times)
        )
    if json_path is not None:
        with open(json_path, "a") as out:
            for r in rows:
                out.write(json.dumps({"url": url, "max_batch_size": max_batch_size, **r}) + "\n")


if __name__ == "__main__":
    run_script(main)
