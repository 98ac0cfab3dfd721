"""Model parallelism across processes: torchrun on one machine, and two 'nodes' over loopback."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed_worker import build, run

WORKER = str(Path(__file__).with_name("distributed_worker.py"))
ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


@pytest.fixture(scope="module")
def single_process(checkpoint: Path, tokenizer_path: str) -> dict:
    return run(build(str(checkpoint), tokenizer_path))


def assert_same(result: dict, expected: dict) -> None:
    torch.testing.assert_close(result["logits"], expected["logits"], atol=1e-5, rtol=1e-5)
    assert result["greedy"] == expected["greedy"]
    assert result["sampled"] == expected["sampled"]


def test_two_shards_on_two_processes_match_one_shard(
    checkpoint_2_shards: Path, tokenizer_path: str, single_process: dict, tmp_path: Path
) -> None:
    command = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()), WORKER)
    command += [str(checkpoint_2_shards), tokenizer_path, str(tmp_path)]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert_same(ranks[0], single_process)
    assert_same(ranks[1], ranks[0])
    assert single_process["greedy"] != single_process["sampled"]


def test_two_nodes_over_loopback(
    checkpoint_2_shards: Path, tokenizer_path: str, single_process: dict, tmp_path: Path
) -> None:
    port = str(free_port())
    nodes = []
    for node_rank in ("0", "1"):
        command = torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", node_rank)
        command += ["--master_addr", "127.0.0.1", "--master_port", port, WORKER]
        command += [str(checkpoint_2_shards), tokenizer_path, str(tmp_path)]
        nodes.append(subprocess.Popen(command, env=environment(), stderr=subprocess.PIPE, text=True))
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    for rank in range(2):
        assert_same(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), single_process)
