"""Hugging Face folders read as Meta's: names, rotary row order, config.json, and bad folders refused."""

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama.convert import to_hugging_face
from llama.hf import (
    config_from_args,
    feed_forward_params,
    halves_to_interleaved,
    interleaved_to_halves,
    params_from_config,
)
from llama.model import ModelArgs
from tests.helpers import GROUPED_QUERY, logits_of, model_args

# config.json of meta-llama/Llama-2-7b-hf, as written by transformers 4.31.
LLAMA2_7B_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


def test_hugging_face_folder_gives_the_same_logits_as_its_meta_folder(
    hugging_face: Path, checkpoint: Path, tokenizer_path: str
) -> None:
    assert torch.equal(logits_of(hugging_face, hugging_face / "tokenizer.model"), logits_of(checkpoint, tokenizer_path))


def test_sharded_hugging_face_folder_is_read_through_its_index(
    checkpoint_2_shards: Path, checkpoint: Path, tokenizer_path: str, tmp_path: Path
) -> None:
    to_hugging_face(checkpoint_2_shards, tmp_path / "hf", tokenizer_path, max_file_bytes=350_000)
    files = sorted(p.name for p in (tmp_path / "hf").glob("model*"))
    assert files == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)] + ["model.safetensors.index.json"]
    assert torch.equal(logits_of(tmp_path / "hf", tokenizer_path), logits_of(checkpoint, tokenizer_path))


def test_rotary_row_order_round_trips_and_keeps_heads_apart() -> None:
    rows = torch.arange(2 * 8).float().unsqueeze(1)  # two heads of head_dim 8
    halves = interleaved_to_halves(rows, head_dim=8)
    assert halves[:8, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert halves[8:, 0].tolist() == [8, 10, 12, 14, 9, 11, 13, 15]
    assert torch.equal(halves_to_interleaved(halves, head_dim=8), rows)


def test_llama2_7b_hugging_face_config_gives_metas_params() -> None:
    params = params_from_config(LLAMA2_7B_HF_CONFIG, Path("config.json"))
    assert params == {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "multiple_of": 256,
        "norm_eps": 1e-05,
        "vocab_size": 32000,
    }


@pytest.mark.parametrize(
    ("dim", "width", "expected"),
    [
        (4096, 11008, {"multiple_of": 256}),  # Llama 2 7B
        (5120, 13824, {"multiple_of": 256}),  # 13B
        (8192, 28672, {"multiple_of": 4096, "ffn_dim_multiplier": 1.3}),  # 70B
        (64, 224, {"multiple_of": 224}),
        (64, 100, {"multiple_of": 100, "ffn_dim_multiplier": 100 / 170}),  # narrower than 8/3 dim
    ],
)
def test_any_feed_forward_width_has_params(dim: int, width: int, expected: dict) -> None:
    params = feed_forward_params(dim, width)
    assert params == expected
    assert ModelArgs(dim=dim, **params).ffn_dim == width


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "rope_scaling",
            {"rope_type": "linear", "factor": 2.0},
            'rope_scaling is {"rope_type": "linear", "factor": 2.0}',
        ),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5}, 'rope_parameters.rope_type is "llama3"'),
        ("tie_word_embeddings", True, "tie_word_embeddings is true"),
        ("attention_bias", True, "attention_bias is true"),
        ("mlp_bias", True, "mlp_bias is true"),
        ("hidden_act", "gelu", 'hidden_act is "gelu"'),
        ("head_dim", 32, "head_dim is 32"),
        ("model_type", "mistral", 'model_type is "mistral"'),
    ],
)
def test_config_that_params_json_cannot_express_names_the_field(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{message}, which Meta's params.json cannot express")):
        params_from_config({**LLAMA2_7B_HF_CONFIG, field: value}, Path("config.json"))


def test_unsupported_config_is_refused_when_building(hugging_face: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(hugging_face, tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "dynamic", "factor": 2.0}}))
    with pytest.raises(ValueError, match="config.json'?: rope_scaling is"):
        logits_of(folder, folder / "tokenizer.model")


def test_exported_config_reads_back_as_the_same_model(tokenizer) -> None:
    args = model_args(GROUPED_QUERY, tokenizer.n_words)
    params = params_from_config(config_from_args(args, torch.float32, tokenizer), Path("config.json"))
    back = ModelArgs.from_params(params)[0]
    assert back.ffn_dim == args.ffn_dim
    assert replace(back, multiple_of=args.multiple_of, ffn_dim_multiplier=args.ffn_dim_multiplier) == args


def edit_safetensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("model.layers.1.mlp.down_proj.weight"), "lacks weight.*model.layers.1.mlp.down_proj.weight"),
        (lambda t: t.update({"model.layers.1.extra.weight": torch.ones(1)}), "unexpected weight.*layers.1.extra"),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(63)}),
            r"weight model.norm.weight has shape \(63,\) but config.json implies \(64,\)",
        ),
    ],
    ids=["missing", "unexpected", "misshapen"],
)
def test_bad_hugging_face_weight_is_named(hugging_face: Path, tmp_path: Path, edit, message: str) -> None:
    folder = Path(shutil.copytree(hugging_face, tmp_path / "hf"))
    edit_safetensors(folder, edit)
    with pytest.raises(ValueError, match=message):
        logits_of(folder, folder / "tokenizer.model")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("hidden_size", "4096", 'hidden_size is "4096", but it must be a positive integer'),
        ("num_hidden_layers", 32.0, "num_hidden_layers is 32.0, but it must be a positive integer"),
        ("num_key_value_heads", 0, "num_key_value_heads is 0, but it must be a positive integer or null"),
        ("rms_norm_eps", -1e-5, "rms_norm_eps is -1e-05, but it must be a positive number"),
        ("intermediate_size", -11008, "intermediate_size is -11008, but it must be a positive integer"),
        ("num_attention_heads", 3, "hidden_size (4096) must be num_attention_heads (3) times an even head size"),
    ],
)
def test_config_json_fields_are_checked_by_their_own_names(field: str, value, expected: str) -> None:
    with pytest.raises(ValueError) as refused:
        params_from_config({**LLAMA2_7B_HF_CONFIG, field: value}, Path("config.json"))
    assert str(refused.value) == f"'config.json': {expected}"


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (0, "is empty (0 bytes): its download did not finish; download it again"),
        (0.5, "is not a valid safetensors file: it is corrupt or an incomplete download; download it again"),
    ],
    ids=["empty", "truncated"],
)
def test_a_damaged_safetensors_file_is_called_damaged(
    hugging_face: Path, tmp_path: Path, cut: float, message: str
) -> None:
    folder = Path(shutil.copytree(hugging_face, tmp_path / "hf"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * cut)])
    with pytest.raises(ValueError) as refused:
        logits_of(folder, folder / "tokenizer.model")
    assert str(refused.value) == f"{str(weights)!r} {message}"
