"""What tests share besides fixtures: small model shapes, random checkpoints, and running commands."""

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

import httpx
import openai
import pytest
import torch

from llama.bench import random_state_dict
from llama.checkpoint import save_checkpoint
from llama.model import ModelArgs, weight_layout

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "models" / "llama-2-demo"
DEMO_MP2 = ROOT / "models" / "llama-2-demo-mp2"

# Plain multi-head attention, and grouped-query attention with a non-default FFN width.
MULTI_HEAD = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}
GROUPED_QUERY = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "multiple_of": 16,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-6,
    "rope_theta": 500000.0,
    "vocab_size": -1,
}


# Prompts of three different lengths, for the test tokenizer.
PROMPTS = ["The cat", "A dog sat on the mat and the sun", "Red"]


def prompt_ids(tokenizer, prompts: list[str] = PROMPTS) -> list[list[int]]:
    return [tokenizer.encode(p, bos=True, eos=False) for p in prompts]


def model_args(params: dict, vocab_size: int) -> ModelArgs:
    return ModelArgs.from_params({**params, "vocab_size": vocab_size})[0]


def split_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs, parts: int) -> list[dict]:
    """Cut a one-shard state dict into `parts` model-parallel shards, as ranks hold them."""
    layout = weight_layout(args)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(parts)]
    for key, tensor in state_dict.items():
        split = layout[key]
        for rank, shard in enumerate(shards):
            if split.dim is None:
                shard[key] = tensor.clone()
            else:
                start, stop = split.part(rank, parts)
                shard[key] = tensor.narrow(split.dim, start, stop - start).clone()
    return shards


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Join model-parallel shards (at most one per KV head) back into one state dict."""
    layout = weight_layout(args)
    return {
        key: tensor if layout[key].dim is None else torch.cat([shard[key] for shard in shards], dim=layout[key].dim)
        for key, tensor in shards[0].items()
    }


def write_checkpoint(
    folder: Path, params: dict, vocab_size: int, n_shards: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """A random checkpoint in Meta's layout; the same seed gives the same weights for any shard count."""
    args = model_args(params, vocab_size)
    state_dict = random_state_dict(args, seed, dtype)
    shards = [state_dict] if n_shards == 1 else split_state_dict(state_dict, args, n_shards)
    save_checkpoint(folder, shards, params)
    return folder


def build(ckpt_dir: Path, tokenizer_path: str, **kwargs):
    """A small generator on the CPU, as users build one."""
    from llama import Llama

    return Llama.build(str(ckpt_dir), tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", **kwargs)


def assert_same_generation(got: tuple, expected: tuple, abs: float = 1e-4) -> None:
    """Two generate(..., logprobs=True) results: the same tokens, and logprobs within `abs`."""
    assert got[0] == expected[0]
    for ours, theirs in zip(got[1], expected[1]):
        assert ours == pytest.approx(theirs, abs=abs)


TOKENS = torch.tensor([[1, 5, 9, 13, 20, 30, 41]])


def logits_of(folder: Path, tokenizer_path: str | Path) -> torch.Tensor:
    """The logits a generator built from the folder gives for TOKENS."""
    return build(folder, str(tokenizer_path)).model(TOKENS, 0)


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


@contextlib.contextmanager
def killed_afterwards(job: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """A job that a failed test might leave running: killed, with its process group if it leads one."""
    try:
        yield job
    finally:
        if job.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(job.pid) == job.pid:
                    os.killpg(job.pid, signal.SIGKILL)
                else:
                    job.kill()
            job.wait()


def written(file: IO[str]) -> str:
    """All a job has written so far to the file that takes its output."""
    file.seek(0)
    return file.read()


def run_together(commands: list[list[str]], timeout: float, **popen) -> list[subprocess.CompletedProcess]:
    """Start the commands side by side (the nodes of one group) and wait for all of them.

    Their stderr goes to files, not pipes: a pipe that nobody reads while the test waits on
    another node fills up and stops its writer, and the whole group with it. Past the deadline
    every node is killed and the test fails with what each one said.
    """
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in commands]
        jobs = [
            stack.enter_context(
                killed_afterwards(subprocess.Popen(c, stderr=f, text=True, start_new_session=True, **popen))
            )
            for c, f in zip(commands, files)
        ]
        deadline = time.monotonic() + timeout
        while any(job.poll() is None for job in jobs) and time.monotonic() < deadline:
            time.sleep(0.1)
        said = [written(f) for f in files]
        unfinished = [i for i, job in enumerate(jobs) if job.poll() is None]
        assert not unfinished, f"nodes {unfinished} still running after {timeout} s; they said:\n" + "\n".join(
            f"--- node {i}:\n{text[-3000:]}" for i, text in enumerate(said)
        )
        return [
            subprocess.CompletedProcess(c, job.returncode, None, text) for c, job, text in zip(commands, jobs, said)
        ]


def read_until(stream: IO[str], done: Callable[[str], bool], timeout: float) -> str:
    """What a job wrote to a pipe up to a line that done() accepts; fails after timeout seconds.

    Reads the pipe's file descriptor itself, so nothing waits in the stream's buffer for a later read.
    """
    deadline, text = time.monotonic() + timeout, ""
    while not any(done(line) for line in text.splitlines()):
        ready, _, _ = select.select([stream.fileno()], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"nothing expected within {timeout} s; so far:\n{text[-3000:]}"
        chunk = os.read(stream.fileno(), 1 << 16)
        assert chunk, f"the job ended first; it said:\n{text[-3000:]}"
        text += chunk.decode(errors="replace")
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def environment() -> dict[str, str]:
    """For commands run as users run them: this checkout importable, one thread per process, loopback."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


class Served:
    """A server running in a subprocess, and clients for it."""

    def __init__(self, url: str, job: subprocess.Popen, key: str | None = None):
        self.url, self.job, self.key = url, job, key
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=key or "unused", max_retries=0, timeout=120)
        self.aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key or "unused", max_retries=0, timeout=120)

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        headers["content-type"] = "application/json"
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=120, **kwargs)

    def metric(self, name: str) -> float:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        text = httpx.get(f"{self.url}/metrics", headers=headers).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@contextlib.contextmanager
def started(
    *flags: str, command: list[str] | None = None, key: str | None = None, ready_within: float = 120
) -> Iterator[Served]:
    """A server run with these flags, once /health says it is ready (a compiled one compiles first).

    What it prints goes to a file: into a pipe that no one reads, 64 KiB of warnings would stop it."""
    port = free_port()
    command = (command or [sys.executable, "-m", "llama.serve"]) + ["--port", str(port), *flags]
    with tempfile.TemporaryFile("w+") as said:
        job = subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=said, stderr=subprocess.STDOUT, text=True)
        with killed_afterwards(job):
            url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + ready_within
            while True:
                assert job.poll() is None, written(said)[-3000:]
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server was not ready in time:\n" + written(said)[-3000:]
                time.sleep(0.2)
            yield Served(url, job, key)
            job.terminate()
            job.wait(timeout=30)


class Mapping(NamedTuple):
    low: int
    high: int
    path: str  # "" for anonymous memory
    resident: int  # bytes
    flags: list[str]


def mappings() -> list[Mapping]:
    """This process's memory mappings, from /proc/self/smaps (Linux)."""
    found, fields = [], {}
    for line in Path("/proc/self/smaps").read_text().splitlines():
        words = line.split(maxsplit=5)
        if "-" in words[0] and ":" not in words[0]:  # a mapping's first line: its addresses, then its file
            low, high = (int(bound, 16) for bound in words[0].split("-"))
            fields = {"low": low, "high": high, "path": words[5] if len(words) > 5 else ""}
        elif words[0] == "Rss:":
            fields["resident"] = int(words[1]) * 1024
        elif words[0] == "VmFlags:":
            found.append(Mapping(**fields, flags=line.split()[1:]))
    return found


def mapping_of(tensor: torch.Tensor) -> Mapping:
    return next(m for m in mappings() if m.low <= tensor.data_ptr() < m.high)
