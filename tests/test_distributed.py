"""Model parallelism across processes: torchrun on one machine, and two 'nodes' over loopback.

One torchrun launch loads several checkpoints in turn, each on two processes, whatever their
shard count or format; every result must match the same checkpoint run in this one process.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from llama.convert import to_hugging_face
from tests.distributed_worker import build, run
from tests.helpers import (
    DEMO_MP2,
    GROUPED_QUERY,
    ROOT,
    environment,
    free_port,
    killed_afterwards,
    read_until,
    run_together,
    torchrun,
    write_checkpoint,
)

WORKER = str(Path(__file__).with_name("distributed_worker.py"))


@pytest.fixture(scope="module")
def single_process(checkpoint: Path, tokenizer_path: str) -> dict:
    return run(build(str(checkpoint), tokenizer_path))


@pytest.fixture(scope="module")
def one_kv_head(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """Grouped-query attention with a single KV head, which two processes must each hold."""
    folder = tmp_path_factory.mktemp("ckpt") / "one-kv-head"
    return write_checkpoint(folder, {**GROUPED_QUERY, "n_kv_heads": 1}, tokenizer.n_words)


@pytest.fixture(scope="module")
def hugging_face_2_files(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, tokenizer_path: str) -> Path:
    """The weights of `checkpoint` as a Hugging Face folder, in two safetensors files."""
    folder = tmp_path_factory.mktemp("ckpt") / "hugging-face"
    to_hugging_face(checkpoint, folder, tokenizer_path, max_file_bytes=350_000)
    return folder


@pytest.fixture(scope="module")
def two_processes(
    checkpoint: Path,
    checkpoint_2_shards: Path,
    one_kv_head: Path,
    hugging_face_2_files: Path,
    tokenizer_path: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, list[dict]]:
    """What each of two torchrun processes computed, per checkpoint folder name."""
    out = tmp_path_factory.mktemp("two-processes")
    folders = [checkpoint, checkpoint_2_shards, one_kv_head, hugging_face_2_files]
    command = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()), WORKER, str(out), tokenizer_path)
    done = subprocess.run(
        command + [str(f) for f in folders], env=environment(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {f.name: [torch.load(out / f"{f.name}-rank{r}.pt", weights_only=True) for r in range(2)] for f in folders}


def assert_same(result: dict, expected: dict) -> None:
    torch.testing.assert_close(result["logits"], expected["logits"], atol=1e-5, rtol=1e-5)
    assert result["greedy"] == expected["greedy"]
    assert result["sampled"] == expected["sampled"]


def assert_both_ranks_match(ranks: list[dict], expected: dict) -> None:
    assert_same(ranks[0], expected)
    assert_same(ranks[1], ranks[0])
    assert expected["greedy"] != expected["sampled"]


def test_two_shards_on_two_processes_match_one_shard(
    two_processes: dict, checkpoint_2_shards: Path, single_process: dict
) -> None:
    assert_both_ranks_match(two_processes[checkpoint_2_shards.name], single_process)


def test_one_shard_splits_over_two_processes(two_processes: dict, checkpoint: Path, single_process: dict) -> None:
    assert_both_ranks_match(two_processes[checkpoint.name], single_process)


def test_single_kv_head_is_copied_to_both_processes(
    two_processes: dict, one_kv_head: Path, tokenizer_path: str
) -> None:
    assert_both_ranks_match(two_processes[one_kv_head.name], run(build(str(one_kv_head), tokenizer_path)))


def test_hugging_face_folder_splits_over_two_processes(
    two_processes: dict, hugging_face_2_files: Path, single_process: dict
) -> None:
    assert len(list(hugging_face_2_files.glob("model-*.safetensors"))) == 2
    assert_both_ranks_match(two_processes[hugging_face_2_files.name], single_process)


def test_compiled_decode_step_on_two_processes_matches_one_eager_process(
    checkpoint_2_shards: Path, tokenizer_path: str, single_process: dict, tmp_path: Path
) -> None:
    command = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()), WORKER, "--compile")
    command += [str(tmp_path), tokenizer_path, str(checkpoint_2_shards)]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        result = torch.load(tmp_path / f"{checkpoint_2_shards.name}-rank{rank}.pt", weights_only=True)
        assert result["greedy"] == single_process["greedy"]
        assert result["greedy_first_alone"] == single_process["greedy"][:1]


def test_two_nodes_over_loopback(
    checkpoint_2_shards: Path, tokenizer_path: str, single_process: dict, tmp_path: Path
) -> None:
    port, commands = str(free_port()), []
    for node_rank in ("0", "1"):
        command = torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", node_rank)
        command += ["--master_addr", "127.0.0.1", "--master_port", port, WORKER]
        commands.append(command + [str(tmp_path), tokenizer_path, str(checkpoint_2_shards)])
    # A peer that hangs is named by the other node well before the test gives up.
    for node in run_together(commands, timeout=300, env={**environment(), "LLAMA_TIMEOUT": "120"}):
        assert node.returncode == 0, node.stderr[-3000:]
    for rank in range(2):
        result = torch.load(tmp_path / f"{checkpoint_2_shards.name}-rank{rank}.pt", weights_only=True)
        assert_same(result, single_process)


FAULTY = str(Path(__file__).with_name("faulty_worker.py"))


def our_lines(stderr: str) -> list[str]:
    """What the processes themselves printed, without torchrun's own log lines and failure summary."""
    ours = ("error", "rank ", "interrupted")
    return [line for line in stderr.splitlines() if line.startswith(ours)]


def assert_no_trace_from_the_ranks(stderr: str) -> None:
    """torchrun's launcher prints a summary of its own; the ranks print no traceback and no gloo text."""
    assert "gloo" not in stderr and "Connection closed" not in stderr
    assert not [line for line in stderr.splitlines() if line.strip().startswith('File "') and "/llama/" in line]


def test_a_bad_folder_on_one_node_is_named_there_and_the_other_node_stops_at_once(tmp_path: Path) -> None:
    port, commands, started = str(free_port()), [], time.monotonic()
    for node_rank, folder in (("0", DEMO_MP2), ("1", tmp_path / "nowhere")):
        command = torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", node_rank)
        command += ["--master_addr", "127.0.0.1", "--master_port", port, "example_text_completion.py"]
        commands.append(command + ["--ckpt_dir", str(folder), "--max_gen_len", "4"])
    nodes = run_together(commands, timeout=120, cwd=ROOT, env=environment())
    errors = [node.stderr for node in nodes]
    assert [node.returncode for node in nodes] == [1, 1]
    assert time.monotonic() - started < 60  # not the collective timeout
    assert our_lines(errors[1]) == [
        f"error on rank 1: checkpoint folder {str(tmp_path / 'nowhere')!r} does not exist: pass --ckpt_dir "
        "pointing to a folder such as llama-2-7b/ that holds consolidated.00.pth and params.json"
    ]
    assert our_lines(errors[0]) == [
        "rank 0: stopping: another process of the group failed or ended (its own message says why)"
    ]
    for stderr in errors:
        assert_no_trace_from_the_ranks(stderr)


def test_a_peer_that_stops_answering_is_named_when_the_timeout_fires(tmp_path: Path) -> None:
    command = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()), FAULTY)
    command += ["--mode", "stop", "--ckpt_dir", str(DEMO_MP2), "--pid_dir", str(tmp_path)]
    environ = {**environment(), "LLAMA_TIMEOUT": "3"}
    job = subprocess.Popen(command, cwd=ROOT, env=environ, stderr=subprocess.PIPE, text=True, start_new_session=True)
    with killed_afterwards(job):
        said = read_until(job.stderr, lambda line: line.startswith("rank 0: stopping"), timeout=120)
        assert "rank 0: stopping: rank 1 did not answer for 3 s (set LLAMA_TIMEOUT to wait longer)" in our_lines(said)
        # The stopped rank: torchrun alone would wait 30 s before it kills it.
        os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
        stderr = said + job.communicate(timeout=120)[1]
    assert job.returncode != 0
    assert_no_trace_from_the_ranks(stderr)


def test_ctrl_c_under_torchrun_says_interrupted_once(tmp_path: Path) -> None:
    command = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()), FAULTY)
    command += ["--mode", "loop", "--ckpt_dir", str(DEMO_MP2), "--pid_dir", str(tmp_path)]
    # Its own session, so that the signal goes to torchrun's process group as a terminal's Ctrl-C would.
    job = subprocess.Popen(
        command, cwd=ROOT, env=environment(), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    with killed_afterwards(job):
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"rank{r}.pid").exists() for r in range(2)) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(job.pid, signal.SIGINT)
        stderr = job.communicate(timeout=60)[1]
    assert job.returncode != 0
    assert our_lines(stderr) == ["interrupted"]
    assert_no_trace_from_the_ranks(stderr)
