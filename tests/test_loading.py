"""Loading: any shard count on one process, tokenizer and params checks, dtypes, memory and pages."""

import gc
import json
from pathlib import Path

import pytest
import torch

from llama.bench import random_state_dict
from llama.checkpoint import MetaCheckpoint
from llama.loading import CACHE_LINE, LARGE_PAGE, RankWeights, load_model, load_weights
from llama.model import Transformer
from llama.runtime import choose_runtime
from llama.tokenizer import Tokenizer
from tests.helpers import GROUPED_QUERY, TOKENS, build, copy_of, mapping_of, mappings, model_args, write_checkpoint


def test_missing_folder(tokenizer_path: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*--ckpt_dir"):
        build(tmp_path / "nowhere", tokenizer_path)


def test_two_shards_on_one_process_match_one_shard(
    checkpoint: Path, checkpoint_2_shards: Path, tokenizer_path: str
) -> None:
    merged = build(checkpoint_2_shards, tokenizer_path).model(TOKENS, 0)
    assert torch.equal(merged, build(checkpoint, tokenizer_path).model(TOKENS, 0))


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
    with torch.device("meta"):
        model = Transformer(checkpoint.args)
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
        with torch.device("meta"):
            model = Transformer(checkpoint.args)
        weights, releaser = RankWeights(checkpoint, 0, 1), checkpoint.release if release else None
        before = resident_file_bytes()
        load_weights(model, weights, choose_runtime("cpu"), release=releaser)
        growth[release] = resident_file_bytes() - before
        del checkpoint, model
    assert growth[False] > size / 2  # the bf16 file, all read to make the fp32 copy
    assert growth[True] < size / 10


def test_cpu_weights_move_into_large_pages_and_out_of_the_file(tokenizer: Tokenizer, tmp_path: Path) -> None:
    params = {**GROUPED_QUERY, "dim": 512}
    file = write_checkpoint(tmp_path, params, tokenizer.n_words) / "consolidated.00.pth"
    model = load_model(file.parent, tokenizer, choose_runtime("cpu"), 32, 2)
    gc.collect()  # nothing but the model keeps the moved weights' memory
    # Each weight's file pages, read to copy it, were given back; the embedding's were never read.
    assert sum(m.resident for m in mappings() if m.path == str(file)) < file.stat().st_size / 10
    weights = model.state_dict()
    for key, tensor in random_state_dict(model_args(params, tokenizer.n_words)).items():
        assert torch.equal(weights[key], tensor), key
    assert mapping_of(model.tok_embeddings.weight).path == str(file)  # a step reads one row of it
    moved = [tensor for key, tensor in weights.items() if key.startswith(("layers.", "norm.", "output."))]
    assert min(tensor.data_ptr() for tensor in moved) % LARGE_PAGE == 0
    large_pages = Path("/sys/kernel/mm/transparent_hugepage").is_dir()
    for tensor in moved:
        where = mapping_of(tensor)
        assert where.path == "" and ("hg" in where.flags or not large_pages), where  # anonymous, advised
        assert tensor.data_ptr() % CACHE_LINE == 0
    assert torch.isfinite(model(TOKENS, 0)).all()  # and it runs once the loading's references are gone


def test_loading_checks_memory_first(checkpoint: Path, tokenizer: Tokenizer) -> None:
    # 633.2 KiB of weights, 32 KiB of KV cache and the 4 KiB rotary table (counted since issue 16). With
    # the table counted, max_seq_len 13 (which the advice named before) would need 641.3 KiB; 10 fits.
    message = r"needs about 669.2 KiB on cpu but only 640.0 KiB is available.*"
    message += r"What would fit: max_batch_size 1 with max_seq_len 10, or 2 model-parallel processes"
    with pytest.raises(ValueError, match=message):
        load_model(checkpoint, tokenizer, choose_runtime("cpu"), 32, 2, available=640 * 1024)


def test_loading_shows_progress_on_rank_0(
    checkpoint: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture
) -> None:
    load_model(checkpoint, tokenizer, choose_runtime("cpu"), 32, 2, show_progress=True)
    assert capsys.readouterr().err.splitlines() == ["loading weights: 1/2 layers", "loading weights: 2/2 layers"]
