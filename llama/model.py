"""The Llama 2 transformer, split across model-parallel ranks with fairscale.

Column-parallel layers shard their output features, row-parallel layers their input features,
so each block needs one all-reduce after attention and one after the feed-forward network.
"""

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region
from torch import nn

FEW_ROWS = 8  # up to this many rows, a compiled CPU step computes products row by row (see linear)


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1  # -1 in params.json: take it from the tokenizer
    multiple_of: int = 256  # the feed-forward width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    max_batch_size: int = 32
    max_seq_len: int = 2048

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> tuple["ModelArgs", list[str]]:
        """Build from a params.json dict; return the args and the keys this library does not know.

        Unknown keys are reported instead of raising, so newer checkpoints still load.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        args = cls(**{k: v for k, v in params.items() if k in known}, **overrides)
        return args, unknown


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T.

    A decode step multiplies each weight by one row per sequence, too few for the CPU's BLAS to
    stream the weight at memory speed (110M shape, 2 cores: 9 GB/s for one row, 4 GB/s for
    eight, where a plain read runs at 18-24). In a compiled step, written as one product and sum
    per row, Inductor fuses the rows into a single loop that reads the weight once, on all cores
    (17 GB/s for one row, 10 for eight). The loop over rows fixes the batch size, so each batch
    size up to FEW_ROWS is compiled once; larger batches share one graph that calls BLAS.
    """
    rows = x.shape[:-1].numel()
    if torch.compiler.is_compiling() and weight.device.type == "cpu" and rows <= FEW_ROWS:
        per_row = [(row * weight).sum(-1) for row in x.reshape(rows, -1)]
        return torch.stack(per_row).view(*x.shape[:-1], -1)
    return F.linear(x, weight)


def no_init(weight: torch.Tensor) -> torch.Tensor:
    """Leave parallel layers uninitialised: the weights come from a checkpoint."""
    return weight


class ColumnParallel(ColumnParallelLinear):
    """fairscale's column-parallel layer (output features split across ranks), run for inference.

    fairscale wraps the product in autograd functions that prepare the backward pass; on a CPU
    they cost 5-7% of a decode step (110M shape), and torch.compile cannot trace them whole.
    The forward pass needs only the product, and for the output layer the all-gather of every
    rank's columns.
    """

    def __init__(self, in_features: int, out_features: int, gather_output: bool = True):
        super().__init__(in_features, out_features, bias=False, gather_output=gather_output, init_method=no_init)
        self.gather = gather_output and fs_init.get_model_parallel_world_size() > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight)
        return gather_from_model_parallel_region(out) if self.gather else out


class RowParallel(RowParallelLinear):
    """fairscale's row-parallel layer (input features split across ranks), run for inference:
    the product, then the all-reduce that sums the ranks' partial results."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False, input_is_parallel=True, init_method=no_init)
        self.reduce = fs_init.get_model_parallel_world_size() > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight)
        if self.reduce:
            dist.all_reduce(out, group=fs_init.get_model_parallel_group())
        return out


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
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = rotary[..., 0].unsqueeze(2), rotary[..., 1].unsqueeze(2)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of every position seen so far, pre-allocated for the longest batch.

    Stored as (batch, kv_heads, seq, head_dim) so attention reads each head contiguously.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, weight: torch.Tensor):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", weight.new_zeros(shape), persistent=False)
        self.register_buffer("v", weight.new_zeros(shape), persistent=False)

    def update(
        self, positions: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, seqlen, kv_heads, head_dim); return the cache's first cache_len positions.

        positions is the start of a run shared by the batch (a plain slice copy) or each token's
        own position, (batch, seqlen), when sequences are at different points.
        """
        bsz, seqlen = k.shape[:2]
        if isinstance(positions, int):
            self.k[:bsz, :, positions : positions + seqlen] = k.transpose(1, 2)
            self.v[:bsz, :, positions : positions + seqlen] = v.transpose(1, 2)
        else:
            rows = torch.arange(bsz, device=k.device).unsqueeze(1)
            self.k[rows, :, positions] = k
            self.v[rows, :, positions] = v
        return self.k[:bsz, :, :cache_len], self.v[:bsz, :, :cache_len]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        model_parallel_size = fs_init.get_model_parallel_world_size()
        n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        # With more ranks than KV heads, each rank holds a copy of the one KV head its query heads use.
        n_kv_heads = max(n_kv_heads, model_parallel_size)
        self.n_local_heads = args.n_heads // model_parallel_size
        self.n_local_kv_heads = n_kv_heads // model_parallel_size
        self.head_dim = args.dim // args.n_heads

        self.wq = ColumnParallel(args.dim, args.n_heads * self.head_dim, gather_output=False)
        self.wk = ColumnParallel(args.dim, n_kv_heads * self.head_dim, gather_output=False)
        self.wv = ColumnParallel(args.dim, n_kv_heads * self.head_dim, gather_output=False)
        self.wo = RowParallel(args.n_heads * self.head_dim, args.dim)
        self.cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        positions: int | torch.Tensor,
        rotary: torch.Tensor,
        mask: torch.Tensor | None,
        cache_len: int,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, rotary), apply_rotary_emb(k, rotary)
        keys, values = self.cache.update(positions, k, v, cache_len)

        # Without a mask every cached position is visible; a causal prefill from position 0
        # lets the fused kernel build its own triangle.
        causal = mask is None and seqlen > 1
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal,
            enable_gqa=self.n_local_kv_heads != self.n_local_heads,
        )  # fmt: skip
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


def ffn_hidden_dim(args: ModelArgs) -> int:
    """Two thirds of 4 * dim (SwiGLU has three matrices), scaled, rounded up to multiple_of."""
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()

        self.w1 = ColumnParallel(dim, hidden_dim, gather_output=False)
        self.w2 = RowParallel(hidden_dim, dim)
        self.w3 = ColumnParallel(dim, hidden_dim, gather_output=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, ffn_hidden_dim(args))
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: int | torch.Tensor,
        rotary: torch.Tensor,
        mask: torch.Tensor | None,
        cache_len: int,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), positions, rotary, mask, cache_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers

        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim, init_method=no_init)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallel(params.dim, params.vocab_size)
        self.setup_caches(params.max_batch_size, params.max_seq_len)

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the KV cache and rotary table on the weights' device and in their dtype.

        Called again after loading, once the weights sit where they will run.
        """
        self.params.max_batch_size, self.params.max_seq_len = max_batch_size, max_seq_len
        weight = self.tok_embeddings.weight
        head_dim = self.params.dim // self.params.n_heads
        for layer in self.layers:
            attention = layer.attention
            attention.cache = KVCache(max_batch_size, max_seq_len, attention.n_local_kv_heads, head_dim, weight)
        # Twice max_seq_len, like the reference, so a caller may run past the window without an index error.
        self.rotary = precompute_rotary_table(head_dim, max_seq_len * 2, self.params.rope_theta).to(weight.device)

    def hidden_states(self, tokens: torch.Tensor, start_pos: int | list[int]) -> torch.Tensor:
        """The final normalised hidden states for tokens (batch, seqlen), written into the cache.

        start_pos is the position of tokens[:, 0]: one int for the whole batch (the reference's
        contract), or one int per sequence so prompts of different lengths can decode together.
        """
        bsz, seqlen = tokens.shape
        device = tokens.device
        if isinstance(start_pos, int):
            positions = start_pos
            rotary = self.rotary[start_pos : start_pos + seqlen].unsqueeze(0)
            cache_len = start_pos + seqlen
            # From position 0 the plain causal triangle is right; the fused kernel builds it itself.
            if start_pos == 0 or seqlen == 1:
                mask = None
            else:
                mask = self.attention_mask(torch.arange(start_pos, cache_len, device=device), cache_len)
        else:
            positions = torch.tensor(start_pos, device=device).unsqueeze(1) + torch.arange(seqlen, device=device)
            rotary = self.rotary[positions]
            cache_len = max(start_pos) + seqlen
            mask = self.attention_mask(positions, cache_len)

        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, positions, rotary, mask, cache_len)
        return self.norm(h)

    @staticmethod
    def attention_mask(positions: torch.Tensor, cache_len: int) -> torch.Tensor:
        """(batch or 1, 1, seqlen, cache_len): each token sees the cached positions up to its own."""
        visible = torch.arange(cache_len, device=positions.device) <= positions.unsqueeze(-1)
        return visible.unsqueeze(-3) if visible.dim() == 3 else visible[None, None]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(h).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int | list[int]) -> torch.Tensor:
        """Logits (batch, seqlen, vocab) in fp32 for every input position, as the reference returns."""
        return self.logits(self.hidden_states(tokens, start_pos))


def num_parameters(args: ModelArgs) -> int:
    """Parameter count of the whole (unsharded) model, for reports and model cards."""
    head_dim = args.dim // args.n_heads
    n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
    attention = 2 * args.dim * args.dim + 2 * args.dim * n_kv_heads * head_dim
    feed_forward = 3 * args.dim * ffn_hidden_dim(args)
    per_layer = attention + feed_forward + 2 * args.dim
    return args.n_layers * per_layer + 2 * args.vocab_size * args.dim + args.dim
