"""The Llama 2 transformer, split across model-parallel ranks with fairscale.

Column-parallel layers shard their output features, row-parallel layers their input features,
so each block needs one all-reduce after attention and one after the feed-forward network.
The network is also the one description of the weights: `weight_layout` reads every weight's
name, shape and split from a copy built on the meta device.
"""

import functools
import math
from dataclasses import astuple, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from torch import nn

from llama.parallel import ColumnParallel, ParallelEmbedding, RowParallel, Split
from llama.params import check_params

# Published Llama shapes: llama2.c's 15M and 110M, TinyLlama's 1.1B (GQA), and Llama 2.
SHAPES = {
    "15M": {"dim": 288, "n_layers": 6, "n_heads": 6, "multiple_of": 32},
    "110M": {"dim": 768, "n_layers": 12, "n_heads": 12, "multiple_of": 32},
    "1.1B": {"dim": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4, "multiple_of": 256},
    "7B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256},
    "13B": {"dim": 5120, "n_layers": 40, "n_heads": 40, "multiple_of": 256},
    "70B": {
        "dim": 8192,
        "n_layers": 80,
        "n_heads": 64,
        "n_kv_heads": 8,
        "multiple_of": 4096,
        "ffn_dim_multiplier": 1.3,
    },
}


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouped-query attention)
    vocab_size: int = -1  # -1 in params.json: take it from the tokenizer
    multiple_of: int = 256  # the feed-forward width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    # What the KV cache is allocated for (Transformer.setup_caches).
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Two thirds of 4 * dim (SwiGLU has three matrices), scaled, rounded up to multiple_of."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params(
        cls, params: dict[str, Any], source: str = "params.json", **overrides: Any
    ) -> tuple["ModelArgs", list[str]]:
        """Build from a params.json dict; return the args and the keys this library does not know.

        Every known field's type and range is checked first, naming `source` and the field.
        Unknown keys are reported instead of raising, so newer checkpoints still load.
        """
        check_params(params, source)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        args = cls(**{k: v for k, v in params.items() if k in known}, **overrides)
        return args, unknown


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the mean of squares overflows or loses precision in fp16/bf16.
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def precompute_rotary_table(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """cos and sin of each position's rotation angles, shape (end, head_dim // 2, 2), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), inv_freq)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rotary_emb(x: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of every head by its position's angle.

    x is (batch, seqlen, heads, head_dim); rotary is (batch or 1, seqlen, head_dim // 2, 2).
    Pairs are adjacent elements, as in Meta's checkpoints (HF's layout permutes q/k rows instead).
    """
    pairs = x.float().view(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = rotary[..., 0].unsqueeze(2), rotary[..., 1].unsqueeze(2)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of every position seen so far, pre-allocated for the longest batch.

    Stored as (batch, kv_heads, seq, head_dim) so attention reads each head contiguously.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, like: torch.Tensor):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", like.new_zeros(shape), persistent=False)
        self.register_buffer("v", like.new_zeros(shape), persistent=False)

    def update(
        self, positions: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_len: int, first_row: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, seqlen, kv_heads, head_dim) in the rows from first_row on; return
        those rows' first cache_len positions.

        positions is the start of a run shared by the batch (a plain slice copy) or each token's
        own position, (batch, seqlen), when sequences are at different points.
        """
        bsz, seqlen = k.shape[:2]
        k_rows, v_rows = self.k[first_row : first_row + bsz], self.v[first_row : first_row + bsz]
        if isinstance(positions, int):
            k_rows[:, :, positions : positions + seqlen] = k.transpose(1, 2)
            v_rows[:, :, positions : positions + seqlen] = v.transpose(1, 2)
        else:  # into the buffers themselves: compiled, a write into k_rows copied those rows' whole cache
            rows = torch.arange(first_row, first_row + bsz, device=k.device).unsqueeze(1)
            self.k[rows, :, positions] = k
            self.v[rows, :, positions] = v
        return k_rows[:, :, :cache_len], v_rows[:, :, :cache_len]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, world: int):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = ColumnParallel(args.dim, args.n_heads * self.head_dim, world, heads=args.n_heads)
        self.wk = ColumnParallel(args.dim, args.n_kv_heads * self.head_dim, world, heads=args.n_kv_heads)
        self.wv = ColumnParallel(args.dim, args.n_kv_heads * self.head_dim, world, heads=args.n_kv_heads)
        self.wo = RowParallel(args.n_heads * self.head_dim, args.dim, world)
        self.n_local_heads = self.wq.output_size_per_partition // self.head_dim
        self.n_local_kv_heads = self.wk.output_size_per_partition // self.head_dim
        self.cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        positions: int | torch.Tensor,
        rotary: torch.Tensor,
        mask: torch.Tensor | None,
        cache_len: int,
        first_row: int,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, rotary), apply_rotary_emb(k, rotary)
        if self.cache is None:  # the tokens attend to each other only
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
        else:
            keys, values = self.cache.update(positions, k, v, cache_len, first_row)

        out = self.attend(q.transpose(1, 2), keys, values, mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x's queries, keys and values, (batch, seqlen, heads * head_dim) each."""
        return self.wq(x), self.wk(x), self.wv(x)

    def attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Softmax attention of q (batch, heads, seqlen, head_dim) over keys and values (batch,
        kv_heads, positions, head_dim); mask True where a query sees a position."""
        # Without a mask every cached position is visible; a causal prefill from position 0
        # lets the fused kernel build its own triangle.
        causal = mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=self.n_local_kv_heads != self.n_local_heads
        )


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, world: int):
        super().__init__()
        self.w1 = ColumnParallel(dim, hidden_dim, world)
        self.w2 = RowParallel(hidden_dim, dim, world)
        self.w3 = ColumnParallel(dim, hidden_dim, world)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_and_up(x)
        return self.w2(F.silu(gate) * up)

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two products of x that SwiGLU multiplies."""
        return self.w1(x), self.w3(x)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, world: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, world)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim, world)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: int | torch.Tensor,
        rotary: torch.Tensor,
        mask: torch.Tensor | None,
        cache_len: int,
        first_row: int,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), positions, rotary, mask, cache_len, first_row)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The network for one rank of `model_parallel_size` (default: fairscale's group size).

    Building it allocates only the weights (nothing on the meta device); `setup_caches` then
    allocates the KV cache where the weights are. Without a cache, the tokens given are the
    whole sequence: training and scoring run that way.
    """

    def __init__(self, params: ModelArgs, model_parallel_size: int | None = None):
        super().__init__()
        world = fs_init.get_model_parallel_world_size() if model_parallel_size is None else model_parallel_size
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers

        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim, world)
        self.layers = nn.ModuleList(TransformerBlock(i, params, world) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallel(params.dim, params.vocab_size, world, gather_output=True)
        self.rotary: torch.Tensor | None = None

    def setup_caches(self) -> None:
        """Allocate the KV cache for params.max_batch_size x max_seq_len tokens, and the rotary
        table, on the weights' device and in their dtype."""
        weight, params = self.tok_embeddings.weight, self.params
        for layer in self.layers:
            attention = layer.attention
            attention.cache = KVCache(
                params.max_batch_size, params.max_seq_len, attention.n_local_kv_heads, params.head_dim, weight
            )
        self.rotary = rotary_table(params).to(weight.device)

    @property
    def has_cache(self) -> bool:
        return self.layers[0].attention.cache is not None

    def hidden_states(self, tokens: torch.Tensor, start_pos: int | list[int], first_row: int = 0) -> torch.Tensor:
        """The final normalised hidden states for tokens (batch, seqlen), written into the cache.

        start_pos is the position of tokens[:, 0]: one int for the whole batch (the reference's
        contract), or one int per sequence so prompts of different lengths can decode together.
        The batch's sequences use the cache rows from first_row on.
        """
        bsz, seqlen = tokens.shape
        device = tokens.device
        if not self.has_cache and start_pos != 0:
            raise ValueError("without a KV cache the tokens must start at position 0: call setup_caches() first")
        rotary = self.rotary if self.has_cache else rotary_table(self.params, seqlen).to(device)
        if isinstance(start_pos, int):
            positions = start_pos
            rotary = rotary[start_pos : start_pos + seqlen].unsqueeze(0)
            cache_len = start_pos + seqlen
            # From position 0 the plain causal triangle is right; the fused kernel builds it itself.
            if start_pos == 0 or seqlen == 1:
                mask = None
            else:
                mask = self.attention_mask(torch.arange(start_pos, cache_len, device=device), cache_len)
        else:
            positions = torch.tensor(start_pos, device=device).unsqueeze(1) + torch.arange(seqlen, device=device)
            rotary = rotary[positions]
            cache_len = max(start_pos) + seqlen
            mask = self.attention_mask(positions, cache_len)

        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, positions, rotary, mask, cache_len, first_row)
        return self.norm(h)

    @staticmethod
    def attention_mask(positions: torch.Tensor, cache_len: int) -> torch.Tensor:
        """(batch or 1, 1, seqlen, cache_len): each token sees the cached positions up to its own."""
        visible = torch.arange(cache_len, device=positions.device) <= positions.unsqueeze(-1)
        return visible.unsqueeze(-3) if visible.dim() == 3 else visible[None, None]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(h).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int | list[int] = 0) -> torch.Tensor:
        """Logits (batch, seqlen, vocab) in fp32 for every input position, as the reference returns."""
        return self.logits(self.hidden_states(tokens, start_pos))


def rotary_table(params: ModelArgs, end: int | None = None) -> torch.Tensor:
    """The model's rotary table for positions up to end; by default twice max_seq_len, like the
    reference, so a caller may run past the window without an index error."""
    return precompute_rotary_table(params.head_dim, 2 * params.max_seq_len if end is None else end, params.rope_theta)


def weight_layout(args: ModelArgs) -> dict[str, Split]:
    """Every weight of the unsharded model, in Meta's key names and the model's order, with its
    shape and how ranks split it: read off a copy of the network built on the meta device."""
    return dict(_weight_layout(astuple(replace(args, max_batch_size=1, max_seq_len=1))))


@functools.lru_cache(maxsize=8)
def _weight_layout(args_fields: tuple) -> dict[str, Split]:
    with torch.device("meta"):
        model = Transformer(ModelArgs(*args_fields), model_parallel_size=1)
    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, ColumnParallel | RowParallel | ParallelEmbedding | RMSNorm):
            shape, dim = tuple(module.weight.shape), getattr(module, "parallel_dim", None)
            layout[f"{name}.weight"] = Split(shape, dim, getattr(module, "heads", None))
    return layout


def num_parameters(args: ModelArgs) -> int:
    """Parameter count of the whole (unsharded) model."""
    return sum(math.prod(split.shape) for split in weight_layout(args).values())
