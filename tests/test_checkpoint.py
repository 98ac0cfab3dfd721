"""Finding, validating, splitting and writing checkpoints, and the errors users see for bad ones."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.checkpoint import (
    md5sum,
    merge_state_dicts,
    parallel_dim,
    random_state_dict,
    split_state_dict,
    weight_shapes,
)
from tests.conftest import GROUPED_QUERY, model_args, write_checkpoint


def build(ckpt_dir: Path, tokenizer_path: str, **kwargs) -> Llama:
    return Llama.build(str(ckpt_dir), tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", **kwargs)


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def test_written_checkpoint_has_meta_layout_and_checklist(checkpoint_2_shards: Path) -> None:
    names = sorted(p.name for p in checkpoint_2_shards.iterdir())
    assert names == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json"]
    for line in (checkpoint_2_shards / "checklist.chk").read_text().splitlines():
        digest, name = line.split("  ")
        assert md5sum(checkpoint_2_shards / name) == digest


def test_split_and_merge_round_trip() -> None:
    state_dict = random_state_dict(model_args(GROUPED_QUERY, 64))
    shards = split_state_dict(state_dict, 2)
    assert shards[0]["tok_embeddings.weight"].shape == (64, 32)  # split along the embedding dim
    assert shards[0]["layers.0.attention.wk.weight"].shape == (16, 64)  # one of two KV heads
    assert shards[0]["layers.0.attention.wo.weight"].shape == (64, 32)
    assert torch.equal(shards[1]["norm.weight"], state_dict["norm.weight"])
    merged = merge_state_dicts(shards)
    assert merged.keys() == state_dict.keys()
    assert all(torch.equal(merged[k], state_dict[k]) for k in state_dict)


def test_every_weight_has_a_known_layout() -> None:
    for key in weight_shapes(model_args(GROUPED_QUERY, 64)):
        assert (parallel_dim(key) is None) == key.endswith("norm.weight")


def test_missing_folder(tokenizer_path: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*--ckpt_dir"):
        build(tmp_path / "nowhere", tokenizer_path)


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


def test_shard_count_must_match_processes(checkpoint_2_shards: Path, tokenizer_path: str) -> None:
    with pytest.raises(ValueError, match="2 shard.*torchrun --nproc_per_node 2"):
        build(checkpoint_2_shards, tokenizer_path)


def test_missing_tokenizer(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        build(checkpoint, str(tmp_path / "tokenizer.model"))


def test_tokenizer_vocabulary_must_match_embedding(tokenizer_path: str, tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt", GROUPED_QUERY, vocab_size=320)
    with pytest.raises(ValueError, match="400 tokens but the checkpoint's embedding has 320 rows"):
        build(folder, tokenizer_path)


def test_unknown_params_keys_are_ignored_with_a_warning(checkpoint: Path, tokenizer_path: str, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    with pytest.warns(UserWarning, match="use_scaled_rope"):
        generator = build(folder, tokenizer_path)
    assert generator.model.params.rope_theta == GROUPED_QUERY["rope_theta"]


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


def test_bad_limits(checkpoint: Path, tokenizer_path: str) -> None:
    with pytest.raises(ValueError, match="max_seq_len must be a positive integer"):
        Llama.build(str(checkpoint), tokenizer_path, max_seq_len=0, max_batch_size=1)


def test_bf16_on_cpu_keeps_close_to_fp32(checkpoint: Path, tokenizer_path: str) -> None:
    fp32, bf16 = build(checkpoint, tokenizer_path), build(checkpoint, tokenizer_path, dtype="bfloat16")
    assert bf16.model.output.weight.dtype == torch.bfloat16
    assert bf16.model.layers[0].attention.cache.k.dtype == torch.bfloat16
    tokens = torch.tensor([[1, 5, 9, 13, 20]])
    torch.testing.assert_close(bf16.model(tokens, 0), fp32.model(tokens, 0), atol=0.1, rtol=0.05)
