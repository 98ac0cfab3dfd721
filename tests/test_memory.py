"""Memory estimates per rank, and the refusal that says what would fit."""

import re
from dataclasses import replace

import pytest
import torch

from llama.memory import check_memory, estimate_memory
from llama.model import SHAPES, ModelArgs, Transformer
from llama.runtime import Runtime

LLAMA2_70B = SHAPES["70B"]


def test_memory_estimate_for_llama2_70b_on_four_gpus() -> None:
    args = ModelArgs(**LLAMA2_70B, vocab_size=32000, max_seq_len=4096, max_batch_size=1)
    need = estimate_memory(args, world=4, dtype=torch.bfloat16)
    assert need.weights / 1e9 == pytest.approx(68.98 * 2 / 4, abs=0.01)  # a quarter of 69B parameters
    assert need.kv_cache == 2 * 80 * 4096 * 2 * 128 * 2  # two of the eight KV heads
    sixteen = estimate_memory(args, world=16, dtype=torch.bfloat16)
    assert sixteen.kv_cache == 2 * 80 * 4096 * 1 * 128 * 2  # one copied KV head per rank


def test_too_little_memory_is_refused_with_the_numbers_and_what_would_fit() -> None:
    args = ModelArgs(**LLAMA2_70B, vocab_size=32000, max_seq_len=4096, max_batch_size=8)
    gpu = Runtime(torch.device("cuda", 0), torch.bfloat16, "nccl")
    with pytest.raises(ValueError) as refused:
        check_memory(args, world=4, runtime=gpu, available=33 * 2**30)
    assert str(refused.value) == (
        "this process needs about 34.6 GiB on cuda:0 but only 33.0 GiB is available: 32.1 GiB for its share "
        "of the weights in bfloat16 and 2.5 GiB for the KV cache of max_batch_size 8 x max_seq_len 4096. "
        "What would fit: max_batch_size 2, or 8 model-parallel processes (on more GPUs or machines)"
    )
    check_memory(args, world=4, runtime=gpu, available=35 * 2**30)
    check_memory(args, world=4, runtime=gpu, available=None)  # unknown: not checked


def test_the_estimate_counts_the_rotary_table_setup_caches_allocates() -> None:
    from tests.helpers import GROUPED_QUERY, model_args

    args = model_args(GROUPED_QUERY, 400)
    args.max_seq_len, args.max_batch_size = 48, 3
    need = estimate_memory(args, world=1, dtype=torch.float32)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.setup_caches()
    assert need.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert need.kv_cache == sum(b.numel() * b.element_size() for b in model.buffers())
    assert need.rotary_table == model.rotary.numel() * model.rotary.element_size() > 0
    assert need.total == need.weights + need.kv_cache + need.rotary_table


@pytest.mark.parametrize("available_gib", [33.0, 32.3, 32.15])
def test_what_the_refusal_says_would_fit_does_fit(available_gib: float) -> None:
    args = ModelArgs(**LLAMA2_70B, vocab_size=32000, max_seq_len=4096, max_batch_size=8)
    gpu = Runtime(torch.device("cuda", 0), torch.bfloat16, "nccl")
    available = int(available_gib * 2**30)
    with pytest.raises(ValueError) as refused:
        check_memory(args, world=4, runtime=gpu, available=available)
    advice = str(refused.value).split("What would fit: ")[1]
    batch = re.match(r"max_batch_size (\d+)(?: with max_seq_len (\d+))?", advice)
    limits = {"max_batch_size": int(batch[1])} | ({"max_seq_len": int(batch[2])} if batch[2] else {})
    check_memory(replace(args, **limits), world=4, runtime=gpu, available=available)  # fits
    grown = "max_seq_len" if batch[2] else "max_batch_size"  # and one more would not
    with pytest.raises(ValueError):
        check_memory(replace(args, **{**limits, grown: limits[grown] + 1}), world=4, runtime=gpu, available=available)
