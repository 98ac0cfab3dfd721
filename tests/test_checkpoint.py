"""Finding, validating, splitting and writing checkpoints, and the errors users see for bad ones."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import llama.checkpoint
from llama import Llama
from llama.bench import SHAPES
from llama.checkpoint import (
    MetaCheckpoint,
    RankWeights,
    check_memory,
    check_model_parallel_size,
    estimate_memory,
    load_weights,
    md5sum,
    merge_state_dicts,
    parallel_dim,
    random_state_dict,
    split_state_dict,
    weight_shapes,
)
from llama.model import ModelArgs, Transformer
from llama.runtime import Runtime, choose_runtime
from llama.tokenizer import Tokenizer
from tests.conftest import GROUPED_QUERY, MULTI_HEAD, model_args, write_checkpoint

TOKENS = torch.tensor([[1, 5, 9, 13, 20, 30, 41]])
LLAMA2_70B = SHAPES["70B"]


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


def test_two_shards_on_one_process_match_one_shard(
    checkpoint: Path, checkpoint_2_shards: Path, tokenizer_path: str
) -> None:
    merged = build(checkpoint_2_shards, tokenizer_path).model(TOKENS, 0)
    assert torch.equal(merged, build(checkpoint, tokenizer_path).model(TOKENS, 0))


def expected_part(key: str, tensor: torch.Tensor, rank: int, world: int, n_kv_heads: int) -> torch.Tensor:
    dim = parallel_dim(key)
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
            llama.checkpoint.reshard(tmp_path / "1", folder, n_shards)
        source = MetaCheckpoint(folder)
        for world in (1, 2, 4):
            for rank in range(world):
                for key, tensor in full.items():
                    expected = expected_part(key, tensor, rank, world, n_kv_heads)
                    assert torch.equal(source.read(key, rank, world), expected), (n_shards, world, rank, key)


def test_more_ranks_than_kv_heads_each_get_a_copy_of_their_head() -> None:
    args = model_args({**GROUPED_QUERY, "n_kv_heads": 1}, 64)
    shapes = llama.checkpoint.rank_shapes(args, rank=1, world=4)
    assert shapes["layers.0.attention.wq.weight"] == (16, 64)  # one of four query heads
    assert shapes["layers.0.attention.wk.weight"] == (16, 64)  # the one KV head, copied
    assert llama.checkpoint.part_range("layers.0.attention.wv.weight", 32, rank=3, world=4, n_kv_heads=2) == (16, 32)


@pytest.mark.parametrize(
    ("params", "world", "message"),
    [
        (MULTI_HEAD, 3, r"n_heads \(4\) is not divisible by 3\. It can run on 1, 2, 4"),
        ({**GROUPED_QUERY, "n_heads": 8, "n_kv_heads": 4}, 8, None),
        ({**GROUPED_QUERY, "n_heads": 6, "n_kv_heads": 2, "dim": 96}, 3, "3 is not a multiple of n_kv_heads"),
        ({**MULTI_HEAD, "dim": 60, "n_heads": 2}, 4, r"n_heads \(2\)"),
    ],
)
def test_model_parallel_size_must_split_the_model_evenly(params: dict, world: int, message: str | None) -> None:
    args = model_args(params, 64)
    if message is None:
        check_model_parallel_size(args, world)
    else:
        with pytest.raises(ValueError, match=message):
            check_model_parallel_size(args, world)


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


def test_bad_limits(checkpoint: Path, tokenizer_path: str) -> None:
    with pytest.raises(ValueError, match="max_seq_len must be a positive integer"):
        Llama.build(str(checkpoint), tokenizer_path, max_seq_len=0, max_batch_size=1)


def test_bf16_on_cpu_keeps_close_to_fp32(checkpoint: Path, tokenizer_path: str) -> None:
    fp32, bf16 = build(checkpoint, tokenizer_path), build(checkpoint, tokenizer_path, dtype="bfloat16")
    assert bf16.model.output.weight.dtype == torch.bfloat16
    assert bf16.model.layers[0].attention.cache.k.dtype == torch.bfloat16
    tokens = torch.tensor([[1, 5, 9, 13, 20]])
    torch.testing.assert_close(bf16.model(tokens, 0), fp32.model(tokens, 0), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("shards", [1, 2])
def test_pages_released_while_loading_read_back_the_same(shards: int, tokenizer: Tokenizer, tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path, GROUPED_QUERY, tokenizer.n_words, shards, dtype=torch.bfloat16)
    checkpoint = MetaCheckpoint(folder)
    model = Transformer(replace(checkpoint.args, max_seq_len=1, max_batch_size=1))
    load_weights(model, RankWeights(checkpoint, 0, 1), choose_runtime("cpu"), release=checkpoint.release)
    expected = random_state_dict(model_args(GROUPED_QUERY, tokenizer.n_words), dtype=torch.bfloat16)
    loaded = model.state_dict()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor.float())
        assert torch.equal(checkpoint.read(key, 0, 1), tensor)  # the same mapping, after its pages were dropped


def resident_file_bytes() -> int:
    """File pages mapped into this process and in memory (Linux)."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssFile:"))


def test_loading_gives_back_the_mapped_pages_it_copied(tokenizer: Tokenizer, tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path, {**GROUPED_QUERY, "dim": 512}, tokenizer.n_words, dtype=torch.bfloat16)
    size = (folder / "consolidated.00.pth").stat().st_size
    growth = {}
    for release in (False, True):
        checkpoint = MetaCheckpoint(folder)  # mapped until it is dropped
        model = Transformer(replace(checkpoint.args, max_seq_len=1, max_batch_size=1))
        weights, releaser = RankWeights(checkpoint, 0, 1), checkpoint.release if release else None
        before = resident_file_bytes()
        load_weights(model, weights, choose_runtime("cpu"), release=releaser)
        growth[release] = resident_file_bytes() - before
        del checkpoint, model
    assert growth[False] > size / 2  # the bf16 file, all read to make the fp32 copy
    assert growth[True] < size / 10


def test_memory_estimate_for_llama2_70b_on_four_gpus() -> None:
    args = ModelArgs(**LLAMA2_70B, vocab_size=32000, max_seq_len=4096, max_batch_size=1)
    need = estimate_memory(args, rank=0, world=4, dtype=torch.bfloat16)
    assert need.weights / 1e9 == pytest.approx(68.98 * 2 / 4, abs=0.01)  # a quarter of 69B parameters
    assert need.kv_cache == 2 * 80 * 4096 * 2 * 128 * 2  # two of the eight KV heads
    sixteen = estimate_memory(args, rank=15, world=16, dtype=torch.bfloat16)
    assert sixteen.kv_cache == 2 * 80 * 4096 * 1 * 128 * 2  # one copied KV head per rank


def test_too_little_memory_is_refused_with_the_numbers_and_what_would_fit() -> None:
    args = ModelArgs(**LLAMA2_70B, vocab_size=32000, max_seq_len=4096, max_batch_size=8)
    gpu = Runtime(torch.device("cuda", 0), torch.bfloat16, "nccl")
    with pytest.raises(ValueError) as refused:
        check_memory(args, rank=0, world=4, runtime=gpu, available=33 * 2**30)
    assert str(refused.value) == (
        "this process needs about 34.6 GiB on cuda:0 but only 33.0 GiB is available: 32.1 GiB for its share "
        "of the weights in bfloat16 and 2.5 GiB for the KV cache of max_batch_size 8 x max_seq_len 4096. "
        "What would fit: max_batch_size 2, or 8 model-parallel processes (on more GPUs or machines)"
    )
    check_memory(args, rank=0, world=4, runtime=gpu, available=35 * 2**30)
    check_memory(args, rank=0, world=4, runtime=gpu, available=None)  # unknown: not checked


def test_build_checks_memory_before_loading(
    checkpoint: Path, tokenizer_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llama.checkpoint, "available_memory", lambda device: 640 * 1024)
    message = r"needs about 665.2 KiB on cpu but only 640.0 KiB is available.*"
    message += r"What would fit: max_batch_size 1 with max_seq_len 13, or 2 model-parallel processes"
    with pytest.raises(ValueError, match=message):
        build(checkpoint, tokenizer_path)


def test_loading_shows_progress_on_rank_0(
    checkpoint: Path, tokenizer_path: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(llama.checkpoint, "PROGRESS_MIN_PARAMETERS", 0)
    build(checkpoint, tokenizer_path)
    assert capsys.readouterr().err.splitlines() == ["loading weights: 1/2 layers", "loading weights: 2/2 layers"]
