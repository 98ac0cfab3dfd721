"""Meta's layout: validated names, shapes and files, any shard count read as any other, and the
errors users see for bad folders."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.bench import random_state_dict
from llama.checkpoint import MetaCheckpoint, md5sum
from llama.reshard import reshard
from tests.helpers import GROUPED_QUERY, MULTI_HEAD, ROOT, build, copy_of, environment, model_args, write_checkpoint


def test_written_checkpoint_has_meta_layout_and_checklist(checkpoint_2_shards: Path) -> None:
    names = sorted(p.name for p in checkpoint_2_shards.iterdir())
    assert names == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json"]
    for line in (checkpoint_2_shards / "checklist.chk").read_text().splitlines():
        digest, name = line.split("  ")
        assert md5sum(checkpoint_2_shards / name) == digest


def test_folder_without_shards(tokenizer_path: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no consolidated.NN.pth"):
        build(tmp_path, tokenizer_path)


def test_missing_params_json(checkpoint: Path, tokenizer_path: str, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    (folder / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json"):
        build(folder, tokenizer_path)


@pytest.mark.parametrize(
    ("content", "message"), [("{dim: 1", "not valid JSON"), ("[1]", "JSON object"), ('{"dim": 64}', "lacks n_layers")]
)
def test_malformed_params_json(
    checkpoint: Path, tokenizer_path: str, tmp_path: Path, content: str, message: str
) -> None:
    folder = copy_of(checkpoint, tmp_path)
    (folder / "params.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        build(folder, tokenizer_path)


# Meta's layout, written out independently of the library: the dimension each weight is cut along.
SPLIT_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def expected_part(key: str, tensor: torch.Tensor, rank: int, world: int, n_kv_heads: int) -> torch.Tensor:
    dim = SPLIT_DIM.get(key.removesuffix(".weight").split(".")[-1])
    if dim is None:
        return tensor
    if key.endswith(("wk.weight", "wv.weight")) and world > n_kv_heads:
        return tensor.chunk(n_kv_heads)[rank * n_kv_heads // world]
    return tensor.chunk(world, dim)[rank]


@pytest.mark.parametrize("params", [MULTI_HEAD, GROUPED_QUERY, {**GROUPED_QUERY, "n_kv_heads": 1}])
def test_any_shard_count_reads_as_any_other(params: dict, tmp_path: Path) -> None:
    args = model_args(params, 64)
    full = random_state_dict(args)
    n_kv_heads = args.n_kv_heads or args.n_heads
    for n_shards in (1, 2, 4):
        folder = tmp_path / str(n_shards)
        if n_shards <= n_kv_heads:
            write_checkpoint(folder, params, 64, n_shards)
        else:  # each shard holds a copy of its KV head, as the rank that loads it does
            reshard(tmp_path / "1", folder, n_shards)
        source = MetaCheckpoint(folder)
        for world in (1, 2, 4):
            for rank in range(world):
                for key, tensor in full.items():
                    expected = expected_part(key, tensor, rank, world, n_kv_heads)
                    assert torch.equal(source.read(key, rank, world), expected), (n_shards, world, rank, key)


def edit_weights(folder: Path, edit) -> None:
    path = folder / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    edit(state_dict)
    torch.save(state_dict, path)


def test_missing_weight_is_named(checkpoint: Path, tokenizer_path: str, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    edit_weights(folder, lambda sd: sd.pop("layers.1.feed_forward.w2.weight"))
    with pytest.raises(ValueError, match="lacks weight.*layers.1.feed_forward.w2.weight"):
        build(folder, tokenizer_path)


def test_misshapen_weight_is_named(checkpoint: Path, tokenizer_path: str, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    edit_weights(folder, lambda sd: sd.update({"norm.weight": torch.ones(63)}))
    with pytest.raises(ValueError, match=r"norm.weight has shape \(63,\) but params.json implies \(64,\)"):
        build(folder, tokenizer_path)


def test_misshapen_weight_in_a_later_shard_names_the_file(
    checkpoint_2_shards: Path, tokenizer_path: str, tmp_path: Path
) -> None:
    folder = copy_of(checkpoint_2_shards, tmp_path)
    path = folder / "consolidated.01.pth"
    state_dict = torch.load(path, weights_only=True)
    state_dict["layers.0.attention.wk.weight"] = torch.ones(32, 64)  # both KV heads instead of one
    torch.save(state_dict, path)
    message = r"consolidated.01.pth: weight layers.0.attention.wk.weight has shape \(32, 64\) but params.json "
    with pytest.raises(ValueError, match=message + r"implies \(16, 64\) for shard 1 of 2"):
        build(folder, tokenizer_path)


def test_unexpected_weight_is_named_and_rope_freqs_ignored(
    checkpoint: Path, tokenizer_path: str, tmp_path: Path
) -> None:
    folder = copy_of(checkpoint, tmp_path)
    edit_weights(folder, lambda sd: sd.update({"rope.freqs": torch.ones(8)}))
    build(folder, tokenizer_path)  # Meta's shards carry rope.freqs
    edit_weights(folder, lambda sd: sd.update({"layers.9.extra.weight": torch.ones(1)}))
    with pytest.raises(ValueError, match="unexpected weight.*layers.9.extra.weight"):
        build(folder, tokenizer_path)


class Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_checkpoints_cannot_run_code(checkpoint: Path, tokenizer_path: str, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    edit_weights(folder, lambda sd: sd.update({"payload": Payload()}))
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        build(folder, tokenizer_path)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("n_heads", "6", 'n_heads is "6", but it must be a positive integer'),
        ("n_layers", 4.0, "n_layers is 4.0, but it must be a positive integer"),
        ("n_kv_heads", 0, "n_kv_heads is 0, but it must be a positive integer or null"),
        ("norm_eps", "x", 'norm_eps is "x", but it must be a positive number'),
        ("dim", -64, "dim is -64, but it must be a positive integer"),
        ("vocab_size", 0, "vocab_size is 0, but it must be a positive integer, or -1 for the tokenizer's"),
        ("rope_theta", True, "rope_theta is true, but it must be a positive number"),
        ("ffn_dim_multiplier", -1.3, "ffn_dim_multiplier is -1.3, but it must be a positive number or null"),
        ("n_heads", 5, "dim (64) must be n_heads (5) times an even head size"),
        ("n_kv_heads", 3, "n_heads (4) must be a multiple of n_kv_heads (3)"),
    ],
)
def test_params_json_fields_are_checked_when_the_folder_is_opened(
    checkpoint: Path, tokenizer_path: str, tmp_path: Path, field: str, value, expected: str
) -> None:
    folder = copy_of(checkpoint, tmp_path)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, field: value}))
    with pytest.raises(ValueError) as refused:
        MetaCheckpoint(folder)
    assert str(refused.value) == f"{str(folder / 'params.json')!r}: {expected}"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty (0 bytes): its download did not finish; download it again"),
        (bytes(range(256)) * 16, "is not a valid checkpoint file: it is corrupt or an incomplete download"),
        (None, "is not a valid checkpoint file: it is corrupt or an incomplete download"),  # cut in half
    ],
    ids=["empty", "random_bytes", "truncated"],
)
def test_a_damaged_shard_file_is_called_damaged(
    checkpoint: Path, tmp_path: Path, content: bytes | None, message: str
) -> None:
    folder = copy_of(checkpoint, tmp_path)
    shard = folder / "consolidated.00.pth"
    shard.write_bytes(content if content is not None else shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(f"{str(shard)!r} {message}")):
        MetaCheckpoint(folder)


def test_a_damaged_shard_through_the_example_script_is_one_line(
    checkpoint: Path, tokenizer_path: str, tmp_path: Path
) -> None:
    folder = copy_of(checkpoint, tmp_path)
    (folder / "consolidated.00.pth").write_bytes(b"")
    command = [
        sys.executable,
        "example_text_completion.py",
        "--ckpt_dir",
        str(folder),
        "--tokenizer_path",
        tokenizer_path,
    ]
    done = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    shard = str(folder / "consolidated.00.pth")
    assert done.stderr == f"error: {shard!r} is empty (0 bytes): its download did not finish; download it again\n"
