"""python -m llama.verify and --verify: damaged downloads are found before they give nonsense."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.checkpoint import verify
from tests.helpers import DEMO, ROOT, build, copy_of, environment


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300
    )


def damage(path: Path) -> None:
    """Flip a few bytes in the middle of the file: its tensor data, not its structure."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def test_a_sound_folder_passes() -> None:
    done = run("-m", "llama.verify", str(DEMO))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{DEMO}: all 3 files match checklist.chk\n"


def test_a_damaged_file_is_named(checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    damage(folder / "consolidated.00.pth")
    done = run("-m", "llama.verify", str(folder))
    assert done.returncode == 1
    assert done.stderr == (
        f"error: {str(folder)!r}: consolidated.00.pth does not match its md5 sum: the files are damaged or "
        "incomplete; download them again\n"
    )


def test_a_missing_file_or_checklist_is_named(checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    (folder / "params.json").unlink()
    with pytest.raises(ValueError, match="params.json is missing"):
        verify(folder)
    (folder / "checklist.chk").unlink()
    with pytest.raises(FileNotFoundError, match="no checklist.chk in .*: nothing to verify against"):
        verify(folder)


def test_the_ranks_of_a_group_share_the_files(checkpoint_2_shards: Path, tmp_path: Path) -> None:
    folder = copy_of(checkpoint_2_shards, tmp_path)
    damage(folder / "consolidated.01.pth")
    verify(folder, rank=0, world=2)  # checks consolidated.00.pth and checklist's third file
    with pytest.raises(ValueError, match="consolidated.01.pth does not match"):
        verify(folder, rank=1, world=2)


def test_the_scripts_verify_before_loading(checkpoint: Path, tokenizer_path: str, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    damage(folder / "consolidated.00.pth")
    done = run("example_text_completion.py", "--ckpt_dir", str(folder), "--tokenizer_path", tokenizer_path, "--verify")
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {str(folder)!r}: consolidated.00.pth does not match its md5 sum")
    assert "Loaded in" not in done.stdout


def test_nan_weights_are_blamed_on_the_weights(checkpoint: Path, tokenizer_path: str, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    state_dict = torch.load(folder / "consolidated.00.pth", weights_only=True)
    state_dict["layers.0.feed_forward.w2.weight"][3, 5] = float("nan")
    torch.save(state_dict, folder / "consolidated.00.pth")
    generator = build(folder, tokenizer_path)
    with pytest.raises(
        ValueError, match="logits are NaN or infinite: its weights may be corrupt .*python -m llama.verify"
    ):
        generator.text_completion(["The cat"], max_gen_len=4)
