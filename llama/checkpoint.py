"""Meta's checkpoint format: finding, reading, validating, splitting and writing it.

A checkpoint folder holds params.json and one consolidated.NN.pth per model-parallel rank.
Which dimension each weight is split on is written down once, in `PARALLEL_DIM`.
"""

import hashlib
import json
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from fairscale.nn.model_parallel import initialize as fs_init
from torch import nn

from llama.model import ModelArgs, Transformer, ffn_hidden_dim
from llama.runtime import Runtime, is_main_process
from llama.tokenizer import Tokenizer

# Column-parallel weights split their output rows (dim 0), row-parallel ones their input
# columns (dim 1); ParallelEmbedding splits the embedding dimension. Norms are replicated.
PARALLEL_DIM = {
    "tok_embeddings": 1,
    "output": 0,
    "attention.wq": 0,
    "attention.wk": 0,
    "attention.wv": 0,
    "attention.wo": 1,
    "feed_forward.w1": 0,
    "feed_forward.w3": 0,
    "feed_forward.w2": 1,
}

# Meta's shards carry the rotary frequencies, which the model recomputes.
IGNORED_KEYS = {"rope.freqs"}

REQUIRED_PARAMS = ("dim", "n_layers", "n_heads")


def parallel_dim(key: str) -> int | None:
    """The dimension along which a weight is split across ranks, or None if every rank holds all of it."""
    module = key.removesuffix(".weight")
    for name, dim in PARALLEL_DIM.items():
        if module == name or module.endswith("." + name):
            return dim
    return None


def find_shards(ckpt_dir: str | Path) -> list[Path]:
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {str(folder)!r} does not exist: pass --ckpt_dir pointing to a folder "
            "such as llama-2-7b/ that holds consolidated.00.pth and params.json"
        )
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(
            f"no consolidated.NN.pth files in {str(folder)!r}: pass --ckpt_dir pointing to the model "
            "folder (e.g. llama-2-7b/), not its parent"
        )
    expected = [folder / f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if shards != expected:
        names = ", ".join(p.name for p in shards)
        raise FileNotFoundError(f"shards in {str(folder)!r} are not numbered 00..{len(shards) - 1:02d}: found {names}")
    return shards


def read_params(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: every Llama 2 checkpoint folder has a params.json")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); download it again") from err
    if not isinstance(params, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, found {type(params).__name__}")
    missing = [key for key in REQUIRED_PARAMS if key not in params]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {', '.join(missing)}: it is not a Llama params.json")
    return params


def check_shard_count(shards: list[Path], model_parallel_size: int) -> None:
    if len(shards) != model_parallel_size:
        raise ValueError(
            f"the checkpoint in {str(shards[0].parent)!r} has {len(shards)} shard(s) but {model_parallel_size} "
            f"process(es) are running: launch with `torchrun --nproc_per_node {len(shards)}`"
        )


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map one shard; it is untrusted, so only tensors may be unpickled."""
    # Files written by torch < 1.6 are not zip archives and cannot be memory-mapped.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{str(path)!r} is not a readable PyTorch checkpoint: it holds objects other than tensors, "
            "which could run code when loaded, so it was refused"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint ({err}); download it again") from err


def load_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> None:
    """Move each checkpoint tensor into the model, cast once, after checking names and shapes.

    Parameters are replaced rather than copied into, so a memory-mapped CPU shard in the target
    dtype becomes the model's storage without a second copy.
    """
    expected = model.state_dict()
    found = {key: value for key, value in state_dict.items() if key not in IGNORED_KEYS}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise ValueError(f"checkpoint lacks weight(s) {', '.join(missing[:5])}: it does not match params.json")
    if unexpected:
        raise ValueError(
            f"checkpoint has unexpected weight(s) {', '.join(unexpected[:5])}: it does not match params.json"
        )
    for key, tensor in found.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"weight {key} has shape {tuple(tensor.shape)} but params.json implies {tuple(expected[key].shape)} "
                "for this model-parallel rank"
            )
    model.load_state_dict({key: tensor.to(device=device, dtype=dtype) for key, tensor in found.items()}, assign=True)


def load_model(
    ckpt_dir: str | Path, tokenizer: Tokenizer, runtime: Runtime, max_seq_len: int, max_batch_size: int
) -> Transformer:
    """This rank's part of the model, on the runtime's device and in its dtype, with its KV cache.

    The tokenizer fixes the vocabulary: params.json may leave it at -1, and a tokenizer that
    does not match the embedding would silently produce garbage.
    """
    shards = find_shards(ckpt_dir)
    params = read_params(ckpt_dir)
    check_shard_count(shards, fs_init.get_model_parallel_world_size())
    args, unknown = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    if unknown and is_main_process():
        warnings.warn(f"{Path(ckpt_dir) / 'params.json'}: ignoring unknown key(s) {', '.join(unknown)}", stacklevel=3)
    if args.vocab_size == -1:
        args.vocab_size = tokenizer.n_words
    state_dict = load_shard(shards[fs_init.get_model_parallel_rank()])
    embedding = state_dict.get("tok_embeddings.weight")
    if embedding is not None and embedding.shape[0] != tokenizer.n_words:
        raise ValueError(
            f"the tokenizer has {tokenizer.n_words} tokens but the checkpoint's embedding has "
            f"{embedding.shape[0]} rows: use the tokenizer.model that was distributed with these weights"
        )
    if args.vocab_size != tokenizer.n_words:
        raise ValueError(
            f"params.json says vocab_size {args.vocab_size} but the tokenizer has {tokenizer.n_words} "
            "tokens: use the tokenizer.model that was distributed with these weights"
        )
    model = Transformer(args)
    load_weights(model, state_dict, runtime.device, runtime.dtype)
    model.requires_grad_(False)
    model.setup_caches(args.max_batch_size, args.max_seq_len)
    return model


def split_state_dict(state_dict: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """Cut a one-shard state dict into `parts` model-parallel shards."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(parts)]
    for key, tensor in state_dict.items():
        dim = parallel_dim(key)
        if dim is not None and tensor.shape[dim] % parts:
            raise ValueError(f"weight {key} of shape {tuple(tensor.shape)} cannot be split in {parts} along dim {dim}")
        pieces = [tensor] * parts if dim is None else tensor.chunk(parts, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[key] = piece.clone()
    return shards


def merge_state_dicts(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join model-parallel shards back into one state dict."""
    merged = {}
    for key, tensor in shards[0].items():
        dim = parallel_dim(key)
        merged[key] = tensor if dim is None else torch.cat([shard[key] for shard in shards], dim=dim)
    return merged


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder: str | Path, shards: list[dict[str, torch.Tensor]], params: dict[str, Any]) -> None:
    """Write Meta's layout: consolidated.NN.pth, params.json and checklist.chk (md5sum format)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for rank, shard in enumerate(shards):
        name = f"consolidated.{rank:02d}.pth"
        torch.save(shard, folder / name)
        names.append(name)
    (folder / "params.json").write_text(json.dumps(params) + "\n")
    names.append("params.json")
    checklist = "".join(f"{md5sum(folder / name)}  {name}\n" for name in names)
    (folder / "checklist.chk").write_text(checklist)


def weight_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight of the unsharded model and its shape, in Meta's key names."""
    head_dim = args.dim // args.n_heads
    n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
    hidden = ffn_hidden_dim(args)
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        layer = f"layers.{i}."
        shapes[layer + "attention.wq.weight"] = (args.n_heads * head_dim, args.dim)
        shapes[layer + "attention.wk.weight"] = (n_kv_heads * head_dim, args.dim)
        shapes[layer + "attention.wv.weight"] = (n_kv_heads * head_dim, args.dim)
        shapes[layer + "attention.wo.weight"] = (args.dim, args.n_heads * head_dim)
        shapes[layer + "feed_forward.w1.weight"] = (hidden, args.dim)
        shapes[layer + "feed_forward.w2.weight"] = (args.dim, hidden)
        shapes[layer + "feed_forward.w3.weight"] = (hidden, args.dim)
        shapes[layer + "attention_norm.weight"] = (args.dim,)
        shapes[layer + "ffn_norm.weight"] = (args.dim,)
    shapes["norm.weight"] = (args.dim,)
    shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights of a given shape, for tests and benchmarks; scaled so activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in weight_shapes(args).items():
        if len(shape) == 1:
            weight = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            weight = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        state_dict[key] = weight.to(dtype)
    return state_dict
