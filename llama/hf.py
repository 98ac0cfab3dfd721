"""Hugging Face's Llama layout (config.json + safetensors), read as Meta's.

Hugging Face stores the same tensors under other names, with one difference in layout: Meta's
rotary embedding turns adjacent pairs of each query and key head, (x0, x1), (x2, x3), ...,
Hugging Face's turns the two halves against each other, (x0, x_{d/2}), (x1, x_{d/2+1}), ....
Reading (and llama.convert's writing) reorders those rows and touches nothing else, so a round
trip is bit-exact. Meta's params.json has no room for biases, tied embeddings, other activations
or scaled RoPE; a config that uses them is refused with the field named. safetensors is an
optional dependency, imported only here.
"""

import json
from pathlib import Path
from typing import Any

import torch

from llama.checkpoint import check_weight_names
from llama.model import ModelArgs, check_params, weight_layout
from llama.tokenizer import Tokenizer

try:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file
except ImportError as err:
    raise ImportError(
        "Hugging Face checkpoints need the safetensors package: pip install safetensors (or pip install -e '.[hf]')"
    ) from err

# Meta's module names and Hugging Face's; per-layer modules sit under layers.N. / model.layers.N.
HF_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
HF_LAYER_NAMES = {
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

# The weights whose rows the two rotary conventions order differently.
ROTARY_WEIGHTS = ("attention.wq.weight", "attention.wk.weight")

# Older transformers saved the rotary frequencies, which the model recomputes.
HF_IGNORED_SUFFIX = ".rotary_emb.inv_freq"

# Meta's params.json does not record the context length; Llama 2 was trained on 4096 tokens.
LLAMA2_CONTEXT_LENGTH = 4096

# How Meta's own params.json files round the feed-forward width (7B and 13B; 70B). Hugging Face
# keeps only the width, so these are tried first to give those models their own params back.
META_FFN_ROUNDING = ({"multiple_of": 256}, {"multiple_of": 4096, "ffn_dim_multiplier": 1.3})

# params.json's fields as config.json names them.
CONFIG_NAMES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
}

REQUIRED_CONFIG = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

# Config fields whose other values change the network in ways params.json cannot describe.
FIXED_CONFIG = {
    "model_type": "llama",
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "rope_scaling": None,
}

MODEL_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def hf_name(key: str) -> str:
    """Hugging Face's name for the Meta weight `key`."""
    module = key.removesuffix(".weight")
    if module in HF_NAMES:
        return HF_NAMES[module] + ".weight"
    _, layer, name = module.split(".", 2)
    return f"model.layers.{layer}.{HF_LAYER_NAMES[name]}.weight"


def interleaved_to_halves(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from Meta's rotary pairs (0, 1), (2, 3)... to Hugging Face's (0, d/2), (1, d/2+1)..."""
    return weight.unflatten(0, (-1, head_dim // 2, 2)).transpose(1, 2).flatten(0, 2)


def halves_to_interleaved(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `interleaved_to_halves`: works on any run of whole heads."""
    return weight.unflatten(0, (-1, 2, head_dim // 2)).transpose(1, 2).flatten(0, 2)


def feed_forward_params(dim: int, hidden: int) -> dict[str, Any]:
    """multiple_of (and ffn_dim_multiplier) for which the model computes a feed-forward width of `hidden`.

    Failing Meta's own choices, rounding up to a multiple of the width itself gives the width
    whenever the unrounded value does not exceed it; a multiplier below 1 brings it there.
    """
    base = ModelArgs(dim=dim, multiple_of=1).ffn_dim
    candidates = [
        *META_FFN_ROUNDING,
        {"multiple_of": hidden},
        {"multiple_of": hidden, "ffn_dim_multiplier": hidden / base},
    ]
    for candidate in candidates:
        if ModelArgs(dim=dim, **candidate).ffn_dim == hidden:
            return candidate
    raise ValueError(f"intermediate_size {hidden} cannot be expressed with multiple_of and ffn_dim_multiplier")


def params_from_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Meta's params.json for a Hugging Face config, or an error naming the field it cannot express."""

    def refuse(field: str, value: Any, supported: Any) -> None:
        raise ValueError(
            f"{str(path)!r}: {field} is {json.dumps(value)}, which Meta's params.json cannot express "
            f"(only {json.dumps(supported)} converts)"
        )

    missing = [field for field in REQUIRED_CONFIG if field not in config]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {', '.join(missing)}: it is not a Llama config.json")
    for field, supported in FIXED_CONFIG.items():
        if config.get(field, supported) != supported:
            refuse(field, config[field], supported)
    check_params(
        {ours: config[theirs] for ours, theirs in CONFIG_NAMES.items() if theirs in config},
        repr(str(path)),
        CONFIG_NAMES,
    )
    hidden = config["intermediate_size"]
    if not (isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0):
        raise ValueError(f"{str(path)!r}: intermediate_size is {json.dumps(hidden)}, but it must be a positive integer")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        refuse("rope_parameters.rope_type", rope["rope_type"], "default")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = ModelArgs(dim=dim, n_heads=n_heads).head_dim
    if config.get("head_dim", head_dim) != head_dim:
        refuse("head_dim", config["head_dim"], head_dim)

    params = {"dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": n_heads}
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    if n_kv_heads != n_heads:
        params["n_kv_heads"] = n_kv_heads
    params.update(feed_forward_params(dim, config["intermediate_size"]))
    params["norm_eps"] = config.get("rms_norm_eps", 1e-6)  # Hugging Face's default
    params["vocab_size"] = config["vocab_size"]
    rope_theta = rope.get("rope_theta", config.get("rope_theta", ModelArgs.rope_theta))
    if rope_theta != ModelArgs.rope_theta:  # Meta's Llama 2 code does not know the key
        params["rope_theta"] = rope_theta
    return params


def config_from_args(args: ModelArgs, dtype: torch.dtype, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": LLAMA2_CONTEXT_LENGTH,
        # transformers 5 reads rope_parameters; older versions read rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def tokenizer_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """tokenizer_config.json: the SentencePiece model with Llama 2's special tokens, BOS added, EOS not."""
    piece = tokenizer.sp_model.id_to_piece
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": piece(tokenizer.bos_id),
        "eos_token": piece(tokenizer.eos_id),
        "unk_token": piece(tokenizer.sp_model.unk_id()),
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
    }


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err})") from err


def find_weight_files(folder: Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor: from the index of a sharded folder, else the one file."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{str(index)!r} has no weight_map: it is not a safetensors index")
        files = {name: folder / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise FileNotFoundError(f"{str(path)!r}, listed in {INDEX_FILE}, is missing: download it again")
        return files
    paths = sorted(folder.glob("model*.safetensors"))
    if not paths:
        raise FileNotFoundError(
            f"{str(folder)!r} has a config.json but no model*.safetensors: only safetensors weights are read "
            "(pytorch_model*.bin files can run code when loaded)"
        )
    if len(paths) > 1:
        raise FileNotFoundError(f"{str(folder)!r} holds {len(paths)} safetensors files but no {INDEX_FILE}")
    with open_safetensors(paths[0]) as weights:
        return dict.fromkeys(weights.keys(), paths[0])


def open_safetensors(path: Path):
    if path.stat().st_size == 0:
        raise ValueError(f"{str(path)!r} is empty (0 bytes): its download did not finish; download it again")
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{str(path)!r} is not a valid safetensors file: it is corrupt or an incomplete download; download it again"
        ) from err


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, path, metadata={"format": "pt"})


class HuggingFaceCheckpoint:
    """A Hugging Face folder read as Meta's layout: each rank reads only its slice of each tensor."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.params = params_from_config(read_json(self.folder / "config.json"), self.folder / "config.json")
        self.args, self.unknown_params = ModelArgs.from_params(self.params, repr(str(self.folder / "config.json")))
        self.layout = weight_layout(self.args)
        self.scheme = None  # quantized checkpoints are written in Meta's layout only
        self.files = find_weight_files(self.folder)
        self.handles = {}
        for path in sorted(set(self.files.values())):
            self.handles[path] = open_safetensors(path)
        self.check_weights()

    def check_weights(self) -> None:
        expected = {hf_name(key): split.shape for key, split in self.layout.items()}
        found = [name for name in self.files if not name.endswith(HF_IGNORED_SUFFIX)]
        check_weight_names(found, expected, repr(str(self.folder)), "config.json")
        for name, shape in expected.items():
            found_shape = tuple(self.handles[self.files[name]].get_slice(name).get_shape())
            if found_shape != shape:
                raise ValueError(
                    f"{self.files[name].name}: weight {name} has shape {found_shape} but config.json implies {shape}"
                )

    def release(self, tensor: torch.Tensor) -> None:
        """Nothing to do: safetensors hands out tensors of their own, freed when dropped."""

    def is_mapped(self, tensor: torch.Tensor) -> bool:
        """Never: safetensors hands out tensors of their own."""
        return False

    def read(self, key: str, rank: int, world: int) -> torch.Tensor:
        name = hf_name(key)
        weights = self.handles[self.files[name]].get_slice(name)
        split = self.layout[key]
        if split.dim is None:
            return weights[:]
        start, stop = split.part(rank, world)
        tensor = weights[start:stop] if split.dim == 0 else weights[:, start:stop]
        if key.endswith(ROTARY_WEIGHTS):
            tensor = halves_to_interleaved(tensor, self.args.head_dim)
        return tensor
