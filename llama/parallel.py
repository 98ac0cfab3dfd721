"""Model parallelism: which part of each weight a rank holds, the layers that hold it, and which
process counts work.

A weight is either held whole by every rank (the norms) or cut along one dimension into equal,
contiguous parts, one per rank. Weights whose cut dimension is made of attention heads are cut
between heads; grouped-query attention can have fewer key/value heads than ranks, and then each
rank holds a copy of the one KV head its query heads attend with. Loading, resharding, conversion,
memory estimates and the network's own layer sizes all ask this module, so the rule lives here.
"""

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region
from torch import nn


class Sizes(Protocol):
    """The model sizes a split depends on (llama.model.ModelArgs has them)."""

    dim: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int

    @property
    def ffn_dim(self) -> int: ...


def part_size(size: int, world: int, heads: int | None = None) -> int:
    """How much of a dimension of `size` each of `world` ranks holds (at least one head when cut by heads)."""
    if heads is not None and world > heads:
        return size // heads
    return size // world


def part_range(size: int, rank: int, world: int, heads: int | None = None) -> tuple[int, int]:
    """The slice [start, stop) of a dimension of `size` that `rank` of `world` holds.

    With fewer heads than ranks, rank r holds a copy of head r * heads // world: consecutive
    ranks share a head, as their query heads do.
    """
    if heads is not None and world > heads:
        start = rank * heads // world * (size // heads)
    else:
        start = rank * (size // world)
    return start, start + part_size(size, world, heads)


@dataclass(frozen=True)
class Split:
    """How one weight is laid out across ranks."""

    shape: tuple[int, ...]  # the whole, unsharded weight
    dim: int | None  # the dimension cut across ranks; None: every rank holds all of it
    heads: int | None = None  # the cut dimension is made of this many attention heads

    def part(self, rank: int, world: int) -> tuple[int, int]:
        """The range of the cut dimension that `rank` of `world` holds."""
        return part_range(self.shape[self.dim], rank, world, self.heads)

    def part_shape(self, world: int) -> tuple[int, ...]:
        """The shape of each rank's part (every rank's is the same)."""
        if self.dim is None:
            return self.shape
        size = part_size(self.shape[self.dim], world, self.heads)
        return self.shape[: self.dim] + (size,) + self.shape[self.dim + 1 :]


class ColumnParallel(fs_layers.ColumnParallelLinear):
    """fairscale's column-parallel layer: each rank holds some of the output features (weight rows).

    The forward pass is the product, plus the all-gather of every rank's columns for the output
    layer: fairscale's autograd wrappers only prepare a backward pass, and torch.compile cannot
    trace them whole. Built with `torch.empty`, so a model made on the meta device allocates
    nothing. `heads` says the output features are that many attention heads (see llama.parallel).
    """

    parallel_dim = 0

    def __init__(self, in_features: int, out_features: int, world: int, gather_output=False, heads=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.heads = in_features, out_features, heads
        self.gather_output = gather_output
        self.output_size_per_partition = part_size(out_features, world, heads)
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, in_features))
        self.gather = gather_output and world > 1

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x times this rank's weight; quantized layers (llama.quantization) have their own."""
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x)
        return gather_from_model_parallel_region(out) if self.gather else out


class RowParallel(fs_layers.RowParallelLinear):
    """fairscale's row-parallel layer: each rank holds some of the input features (weight columns),
    so the ranks' partial products are summed by an all-reduce."""

    parallel_dim = 1
    heads = None

    def __init__(self, in_features: int, out_features: int, world: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.input_is_parallel = in_features, out_features, True
        self.input_size_per_partition = part_size(in_features, world)
        self.weight = nn.Parameter(torch.empty(out_features, self.input_size_per_partition))
        self.reduce = world > 1

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x)
        if self.reduce:
            dist.all_reduce(out, group=fs_init.get_model_parallel_group())
        return out


class ParallelEmbedding(fs_layers.ParallelEmbedding):
    """fairscale's embedding split along the embedding dimension, gathered after the lookup."""

    parallel_dim = 1
    heads = None

    def __init__(self, num_embeddings: int, embedding_dim: int, world: int):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.embedding_dim_per_partition = part_size(embedding_dim, world)
        self.weight = nn.Parameter(torch.empty(num_embeddings, self.embedding_dim_per_partition))
        self.gather = world > 1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = F.embedding(tokens, self.weight)
        return gather_from_model_parallel_region(out) if self.gather else out


def parallel_size_problem(args: Sizes, world: int) -> str | None:
    """Why the model cannot be split over `world` ranks, or None if it can."""
    if args.n_heads % world:
        return f"n_heads ({args.n_heads}) is not divisible by {world}"
    if world <= args.n_kv_heads and args.n_kv_heads % world:
        return f"n_kv_heads ({args.n_kv_heads}) is not divisible by {world}"
    if world > args.n_kv_heads and world % args.n_kv_heads:
        return f"{world} is not a multiple of n_kv_heads ({args.n_kv_heads}), so KV heads cannot be shared out evenly"
    widths = {"dim": args.dim, "vocab_size": args.vocab_size, "the feed-forward width": args.ffn_dim}
    for name, size in widths.items():
        if size % world:
            return f"{name} ({size}) is not divisible by {world}"
    return None


def model_parallel_sizes(args: Sizes) -> list[int]:
    """Every process count the model can be split over."""
    return [world for world in range(1, args.n_heads + 1) if parallel_size_problem(args, world) is None]


def check_model_parallel_size(args: Sizes, world: int) -> None:
    problem = parallel_size_problem(args, world)
    if problem is not None:
        sizes = ", ".join(map(str, model_parallel_sizes(args)))
        raise ValueError(
            f"this model cannot be split over {world} model-parallel processes: {problem}. It can run on {sizes}"
        )
