"""Resharding on disk: any shard count to any other, bit-exact, one output shard in memory at a time."""

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama.bench import random_state_dict
from llama.checkpoint import md5sum, save_checkpoint
from llama.model import ModelArgs
from llama.reshard import reshard
from tests.helpers import ROOT, environment, killed_afterwards

PROBE = str(Path(__file__).with_name("peak_memory.py"))

# Big enough (136 MB in fp32) that a whole model held in memory would stand out from Python's own.
MEDIUM = {"dim": 1024, "n_layers": 2, "n_heads": 8, "multiple_of": 256, "vocab_size": 4096}


def shards_of(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(path, weights_only=True) for path in sorted(folder.glob("consolidated.*.pth"))]


def assert_same_shards(folder: Path, expected: Path) -> None:
    found, wanted = shards_of(folder), shards_of(expected)
    assert len(found) == len(wanted)
    for shard, expected_shard in zip(found, wanted):
        assert shard.keys() == expected_shard.keys()
        assert all(torch.equal(shard[key], expected_shard[key]) for key in shard)


def test_reshard_splits_and_merges_bit_exactly(checkpoint: Path, checkpoint_2_shards: Path, tmp_path: Path) -> None:
    reshard(checkpoint, tmp_path / "mp2", 2)
    assert_same_shards(tmp_path / "mp2", checkpoint_2_shards)
    reshard(tmp_path / "mp2", tmp_path / "mp4", 4)  # more shards than the two KV heads: each holds a copy
    reshard(tmp_path / "mp4", tmp_path / "mp1", 1)
    assert_same_shards(tmp_path / "mp1", checkpoint)
    assert json.loads((tmp_path / "mp1" / "params.json").read_text()) == json.loads(
        (checkpoint / "params.json").read_text()
    )
    for line in (tmp_path / "mp4" / "checklist.chk").read_text().splitlines():
        digest, name = line.split("  ")
        assert md5sum(tmp_path / "mp4" / name) == digest


def test_reshard_needs_a_new_folder(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is the input folder"):
        reshard(checkpoint, checkpoint, 2)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "consolidated.07.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        reshard(checkpoint, tmp_path / "used", 2)


def test_reshard_refuses_a_size_that_does_not_split_the_model(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"n_heads \(4\) is not divisible by 3\. It can run on 1, 2, 4"):
        reshard(checkpoint, tmp_path / "mp3", 3)
    assert not (tmp_path / "mp3").exists()


def test_reshard_shows_progress(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reshard(checkpoint, tmp_path / "mp2", 2, show_progress=True)
    assert capsys.readouterr().err.splitlines() == [f"writing 2 shard(s): {i}/4 layers" for i in range(1, 5)]


def test_reshard_command_reports_a_mistake_in_one_line(checkpoint: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "llama.reshard", str(checkpoint), str(tmp_path / "mp3")]
    done = subprocess.run(
        command + ["--model-parallel-size", "3"], cwd=ROOT, env=environment(), capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: this model cannot be split over 3 model-parallel processes")
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures memory through Linux's /proc")
def test_resharding_holds_one_output_shard_at_a_time(tmp_path: Path) -> None:
    args = ModelArgs.from_params(MEDIUM)[0]
    save_checkpoint(tmp_path / "mp1", [random_state_dict(args)], MEDIUM)
    command = [sys.executable, PROBE, "llama.reshard", str(tmp_path / "mp1"), str(tmp_path / "mp4")]
    done = subprocess.run(
        command + ["--model-parallel-size", "4"], cwd=ROOT, env=environment(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peak = json.loads(done.stdout.splitlines()[-1])
    share = (tmp_path / "mp4" / "consolidated.00.pth").stat().st_size
    model = (tmp_path / "mp1" / "consolidated.00.pth").stat().st_size
    print(f"share {share / 2**20:.1f} MiB of {model / 2**20:.1f} MiB; peak added: ", end="")
    print(f"private {peak['private'] / 2**20:.1f} MiB, resident {peak['resident'] / 2**20:.1f} MiB")
    assert peak["private"] < 1.5 * share  # two shards at once would be 2x, the whole model 4x


def in_small_disk(command: list[str], disk: Path, size: str, read_only: bool = False) -> subprocess.CompletedProcess:
    """Run command with a tmpfs of `size` mounted on `disk`, in a mount namespace of its own (Linux)."""
    options = f"size={size}" + (",ro" if read_only else "")
    script = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(disk))} && exec {shlex.join(command)}"
    return subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script],
        cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def reshard_command(src: Path, dst: Path, size: int) -> list[str]:
    return [sys.executable, "-m", "llama.reshard", str(src), str(dst), "--model-parallel-size", str(size)]


def test_a_disk_too_small_is_named_before_anything_is_written(checkpoint: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    command = ["sh", "-c", shlex.join(reshard_command(checkpoint, disk / "mp2", 2)) + f"; echo $?; ls -A {disk}"]
    done = in_small_disk(command, disk, "64k")
    exit_code, *left = done.stdout.split()
    assert exit_code == "1" and left == []
    assert re.fullmatch(
        rf"error: no space left on {re.escape(repr(str(disk / 'mp2')))}: the checkpoint needs [\d.]+ MiB, "
        r"the disk has [\d.]+ KiB\n",
        done.stderr,
    ), done.stderr


def test_a_disk_that_fills_up_while_writing_leaves_nothing_behind(tmp_path: Path) -> None:
    args = ModelArgs.from_params(MEDIUM)[0]
    save_checkpoint(tmp_path / "mp1", [random_state_dict(args)], MEDIUM)
    disk = tmp_path / "disk"
    disk.mkdir()
    size = (tmp_path / "mp1" / "consolidated.00.pth").stat().st_size
    # Room for the whole copy at the start; once the first shard is written, another program fills the disk.
    script = (
        f"{shlex.join(reshard_command(tmp_path / 'mp1', disk / 'mp4', 4))} & job=$!; "
        f"while [ ! -e {disk}/.mp4.partial/consolidated.00.pth ]; do sleep 0.01; done; "
        f"head -c {size} /dev/zero > {disk}/other-files 2>/dev/null; "
        f"wait $job; echo $?; ls -A {disk}"
    )
    done = in_small_disk(["sh", "-c", script], disk, str(int(size * 1.2)))
    exit_code, *left = done.stdout.split()
    assert exit_code == "1", done.stderr
    assert re.fullmatch(
        r"error: no space left on .*: the checkpoint needs [\d.]+ MiB, the disk has [\d.]+ \w+\n", done.stderr
    )
    assert left == ["other-files"]  # no mp4, no hidden partial folder


def test_a_read_only_target_is_said_in_one_line(checkpoint: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    done = in_small_disk(reshard_command(checkpoint, disk / "mp2", 2), disk, "1m", read_only=True)
    assert done.returncode == 1
    assert (
        done.stderr == f"error: cannot write to {str(disk / 'mp2')!r}: read-only file system; choose another folder\n"
    )


def test_an_interrupted_run_leaves_nothing_and_a_rerun_works(tmp_path: Path) -> None:
    args = ModelArgs.from_params(MEDIUM)[0]
    save_checkpoint(tmp_path / "mp1", [random_state_dict(args)], MEDIUM)
    dst, partial = tmp_path / "mp4", tmp_path / ".mp4.partial"
    for how in (signal.SIGINT, signal.SIGKILL):
        command = reshard_command(tmp_path / "mp1", dst, 4)
        with killed_afterwards(
            subprocess.Popen(command, cwd=ROOT, env=environment(), stderr=subprocess.PIPE, text=True)
        ) as job:
            deadline = time.monotonic() + 60
            while not (partial / "consolidated.00.pth").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            job.send_signal(how)
            _, stderr = job.communicate(timeout=60)
        assert not dst.exists()
        if how == signal.SIGINT:
            assert job.returncode == 130 and stderr == "interrupted\n"
            assert not partial.exists()
    # Killed outright, it left its hidden partial folder, which the next run replaces.
    done = subprocess.run(
        reshard_command(tmp_path / "mp1", dst, 4), cwd=ROOT, env=environment(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mp1", "mp4"]
    for line in (dst / "checklist.chk").read_text().splitlines():
        digest, name = line.split("  ")
        assert md5sum(dst / name) == digest
