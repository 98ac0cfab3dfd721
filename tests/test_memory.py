"""Memory estimates per rank, and the refusal that says what would fit."""

import pytest
import torch

from llama.memory import check_memory, estimate_memory
from llama.model import SHAPES, ModelArgs
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
