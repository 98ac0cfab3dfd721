"""Model parallelism's layout: which part of each weight a rank holds, and which process counts work."""

import pytest
import torch

from llama.bench import random_state_dict
from llama.model import weight_layout
from llama.parallel import check_model_parallel_size, part_range
from tests.helpers import GROUPED_QUERY, MULTI_HEAD, merge_state_dicts, model_args, split_state_dict


def test_split_and_merge_round_trip() -> None:
    args = model_args(GROUPED_QUERY, 64)
    state_dict = random_state_dict(args)
    shards = split_state_dict(state_dict, args, 2)
    assert shards[0]["tok_embeddings.weight"].shape == (64, 32)  # split along the embedding dim
    assert shards[0]["layers.0.attention.wk.weight"].shape == (16, 64)  # one of two KV heads
    assert shards[0]["layers.0.attention.wo.weight"].shape == (64, 32)
    assert torch.equal(shards[1]["norm.weight"], state_dict["norm.weight"])
    merged = merge_state_dicts(shards, args)
    assert merged.keys() == state_dict.keys()
    assert all(torch.equal(merged[k], state_dict[k]) for k in state_dict)


def test_every_weight_has_a_known_layout() -> None:
    for key, split in weight_layout(model_args(GROUPED_QUERY, 64)).items():
        assert (split.dim is None) == key.endswith("norm.weight")


def test_more_ranks_than_kv_heads_each_get_a_copy_of_their_head() -> None:
    args = model_args({**GROUPED_QUERY, "n_kv_heads": 1}, 64)
    layout = weight_layout(args)
    assert layout["layers.0.attention.wq.weight"].part_shape(world=4) == (16, 64)  # one of four query heads
    assert layout["layers.0.attention.wk.weight"].part_shape(world=4) == (16, 64)  # the one KV head, copied
    assert layout["layers.0.attention.wk.weight"].part(rank=1, world=4) == (0, 16)
    assert part_range(32, rank=3, world=4, heads=2) == (16, 32)


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
