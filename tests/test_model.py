"""The transformer against Hugging Face's independent implementation, and the KV cache against full passes."""

import pytest
import torch

from llama.bench import random_state_dict
from llama.loading import load_weights
from llama.model import SHAPES, ModelArgs, RMSNorm, Transformer, apply_rotary_emb, num_parameters, weight_layout
from llama.runtime import choose_runtime
from tests.helpers import GROUPED_QUERY, MULTI_HEAD, model_args

VOCAB = 97


def build(args: ModelArgs, seed: int = 0, cache: bool = True) -> tuple[Transformer, dict[str, torch.Tensor]]:
    state_dict = random_state_dict(args, seed)
    with torch.device("meta"):
        model = Transformer(args)
    load_weights(model, state_dict, choose_runtime("cpu"))
    if cache:
        model.setup_caches()
    return model, state_dict


def to_hf_layout(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores each head's rotary pairs as two halves instead of interleaved: permute q/k rows."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_model(args: ModelArgs, state_dict: dict[str, torch.Tensor]):
    transformers = pytest.importorskip("transformers")
    n_kv_heads = args.n_kv_heads or args.n_heads
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    names = {
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w2": "mlp.down_proj",
        "feed_forward.w3": "mlp.up_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    converted = {
        "model.embed_tokens.weight": state_dict["tok_embeddings.weight"],
        "model.norm.weight": state_dict["norm.weight"],
        "lm_head.weight": state_dict["output.weight"],
    }
    for i in range(args.n_layers):
        for ours, theirs in names.items():
            weight = state_dict[f"layers.{i}.{ours}.weight"]
            if ours == "attention.wq":
                weight = to_hf_layout(weight, args.n_heads)
            elif ours == "attention.wk":
                weight = to_hf_layout(weight, n_kv_heads)
            converted[f"model.layers.{i}.{theirs}.weight"] = weight
    hf.load_state_dict(converted, strict=True)
    return hf


@pytest.mark.parametrize("params", [MULTI_HEAD, GROUPED_QUERY], ids=["multi_head", "grouped_query"])
def test_logits_match_hugging_face(params: dict) -> None:
    args = model_args(params, VOCAB)
    args.max_seq_len, args.max_batch_size = 32, 2
    model, state_dict = build(args)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(args, state_dict)(tokens).logits
    ours = model(tokens, 0)
    assert ours.shape == (2, 17, VOCAB)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("params", [MULTI_HEAD, GROUPED_QUERY], ids=["multi_head", "grouped_query"])
def test_incremental_decoding_matches_full_forward(params: dict) -> None:
    args = model_args(params, VOCAB)
    args.max_seq_len, args.max_batch_size = 32, 3
    model, _ = build(args)
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    full = model(tokens, 0)
    pieces = [model(tokens[:, :7], 0), model(tokens[:, 7:12], 7)]  # a chunk at start_pos > 0 needs a mask
    pieces += [model(tokens[:, pos : pos + 1], pos) for pos in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_per_sequence_start_positions_match_separate_runs() -> None:
    args = model_args(GROUPED_QUERY, VOCAB)
    args.max_seq_len, args.max_batch_size = 32, 2
    model, _ = build(args)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    alone = [model(tokens[i : i + 1, : 10 - 4 * i], 0)[0, -1] for i in range(2)]
    alone_next = []
    for i, length in enumerate((10, 6)):
        model(tokens[i : i + 1, :length], 0)
        alone_next.append(model(tokens[i : i + 1, length : length + 2], length)[0])
    # Both prompts prefilled together (the second padded), then each continues at its own position.
    batch_logits = model(tokens[:, :10], 0)
    torch.testing.assert_close(batch_logits[0, 9], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch_logits[1, 5], alone[1], atol=1e-5, rtol=1e-5)
    step = torch.stack([tokens[0, 10:12], tokens[1, 6:8]])
    together = model(step, [10, 6])
    torch.testing.assert_close(together[0], alone_next[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1], alone_next[1], atol=1e-5, rtol=1e-5)


def test_rotary_rotates_interleaved_pairs_by_position() -> None:
    from llama.model import precompute_rotary_table

    table = precompute_rotary_table(head_dim=4, end=3, theta=10000.0)
    x = torch.tensor([[[[1.0, 0.0, 1.0, 0.0]]]]).expand(1, 3, 1, 4)
    rotated = apply_rotary_emb(x, table.unsqueeze(0))
    # Pair 0 turns by 1 radian per position, pair 1 by 1/100.
    for pos in range(3):
        expected = [torch.cos(torch.tensor(pos * 1.0)), torch.sin(torch.tensor(pos * 1.0))]
        expected += [torch.cos(torch.tensor(pos / 100)), torch.sin(torch.tensor(pos / 100))]
        torch.testing.assert_close(rotated[0, pos, 0], torch.stack(expected))


def test_rms_norm_scales_to_unit_root_mean_square() -> None:
    norm = RMSNorm(8, eps=0.0)
    x = torch.randn(3, 8) * 5
    out = norm(x)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(3))


@pytest.mark.parametrize(
    ("shape", "hidden", "billions"), [("7B", 11008, 6.74), ("13B", 13824, 13.02), ("70B", 28672, 68.98)]
)
def test_llama2_shapes(shape: str, hidden: int, billions: float) -> None:
    args = ModelArgs(**SHAPES[shape], vocab_size=32000)
    assert args.ffn_dim == hidden
    assert num_parameters(args) / 1e9 == pytest.approx(billions, abs=0.01)


def test_params_json_with_unknown_and_new_keys() -> None:
    args, unknown = ModelArgs.from_params(
        {"dim": 8, "n_layers": 1, "n_heads": 2, "rope_theta": 1e6, "use_scaled_rope": True}
    )
    assert args.rope_theta == 1e6
    assert unknown == ["use_scaled_rope"]


def test_without_a_cache_the_tokens_attend_to_each_other() -> None:
    """Training and scoring run the whole sequence at once, with no cache to allocate."""
    args = model_args(GROUPED_QUERY, VOCAB)
    args.max_seq_len, args.max_batch_size = 32, 2
    cached, _ = build(args)
    uncached, _ = build(args, cache=False)
    assert not uncached.has_cache
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(uncached(tokens), cached(tokens, 0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="without a KV cache the tokens must start at position 0"):
        uncached(tokens, 3)


def test_built_on_the_meta_device_the_model_holds_no_memory() -> None:
    with torch.device("meta"):
        model = Transformer(ModelArgs(**SHAPES["7B"], vocab_size=32000))
    assert all(p.is_meta for p in model.parameters())
    assert not model.has_cache


@pytest.mark.parametrize("params", [MULTI_HEAD, GROUPED_QUERY], ids=["multi_head", "grouped_query"])
def test_weight_layout_is_the_networks_own(params: dict) -> None:
    args = model_args(params, VOCAB)
    layout = weight_layout(args)
    with torch.device("meta"):
        model = Transformer(args, model_parallel_size=1)
    assert list(layout) == list(model.state_dict())
    assert {key: split.shape for key, split in layout.items()} == {
        key: tuple(t.shape) for key, t in model.state_dict().items()
    }
    for key, split in layout.items():
        assert (split.dim is None) == key.endswith("norm.weight")
        heads = {"wq.weight": args.n_heads, "wk.weight": args.n_kv_heads, "wv.weight": args.n_kv_heads}
        assert split.heads == next((n for name, n in heads.items() if key.endswith(name)), None)


def test_a_sequence_in_any_cache_row_gives_the_same_logits() -> None:
    """A server's slot is a cache row: a sequence prefilled and decoded in row 2 equals one in row 0."""
    args = model_args(GROUPED_QUERY, VOCAB)
    args.max_seq_len, args.max_batch_size = 32, 4
    model, _ = build(args)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    in_row_0 = [model(tokens[:, :9], 0), model(tokens[:, 9:12], [9])]
    other = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    model.hidden_states(other, 0, first_row=0)  # row 0 now holds another sequence
    in_row_2 = [model.logits(model.hidden_states(tokens[:, :9], 0, first_row=2))]
    in_row_2.append(model.logits(model.hidden_states(tokens[:, 9:12], [9], first_row=2)))
    for ours, theirs in zip(in_row_2, in_row_0):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # Rows 1 to 3 decoding together, each at its own position, as a server's slots do.
    together = model.logits(model.hidden_states(tokens[:, 11:12].expand(3, 1), [11, 11, 11], first_row=1))
    torch.testing.assert_close(together[1], in_row_0[1][:, -1], atol=1e-5, rtol=1e-5)
