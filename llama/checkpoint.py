"""Checkpoints on disk: finding, reading, validating, resharding and writing them.

Meta's layout is a folder with params.json and one consolidated.NN.pth per model-parallel rank,
shard i holding exactly what rank i holds in memory. Which dimension each weight is split on is
written down once, in `PARALLEL_DIM`; `part_range` turns it into the rows or columns one rank of
any model-parallel size holds. Loading, resharding and conversion all read weights through it,
so a checkpoint cut into any number of shards runs on any number of processes. Hugging Face
folders are read by llama.convert behind the same `Checkpoint` interface.
"""

import ctypes
import hashlib
import itertools
import json
import math
import mmap
import pickle
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from fairscale.nn.model_parallel import initialize as fs_init
from torch import nn

from llama.model import ModelArgs, Transformer, ffn_hidden_dim
from llama.runtime import Runtime, available_memory, is_main_process
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

# Keys and values: with more ranks than KV heads these are copied, not split (see `part_range`).
KV_WEIGHTS = ("attention.wk", "attention.wv")

# Meta's shards carry the rotary frequencies, which the model recomputes.
IGNORED_KEYS = {"rope.freqs"}

REQUIRED_PARAMS = ("dim", "n_layers", "n_heads")

# The small model this repository ships (see MODEL_CARD.md): what the scripts run when no
# checkpoint is named, so the library can be tried without Meta's weights.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "llama-2-demo"

# Loading or resharding this many parameters takes long enough to deserve progress lines.
PROGRESS_MIN_PARAMETERS = 10**9
LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def module_of(key: str, names: Iterable[str]) -> str | None:
    """Which of `names` (module paths such as "attention.wq") the weight `key` belongs to."""
    module = key.removesuffix(".weight")
    return next((name for name in names if module == name or module.endswith("." + name)), None)


def parallel_dim(key: str) -> int | None:
    """The dimension along which a weight is split across ranks, or None if every rank holds all of it."""
    module = module_of(key, PARALLEL_DIM)
    return None if module is None else PARALLEL_DIM[module]


def kv_heads(args: ModelArgs) -> int:
    return args.n_heads if args.n_kv_heads is None else args.n_kv_heads


def part_range(key: str, size: int, rank: int, world: int, n_kv_heads: int) -> tuple[int, int]:
    """The slice [start, stop) of a weight's parallel dimension (of length `size`) that `rank` of `world` holds.

    Each rank holds an equal, contiguous part. The exception is grouped-query attention on more
    ranks than KV heads: a KV head cannot be cut, so each rank holds a copy of the one head its
    query heads attend with, head rank * n_kv_heads // world.
    """
    if module_of(key, KV_WEIGHTS) is not None and world > n_kv_heads:
        head_size = size // n_kv_heads
        head = rank * n_kv_heads // world
        return head * head_size, (head + 1) * head_size
    part = size // world
    return rank * part, (rank + 1) * part


def part_shape(key: str, shape: tuple[int, ...], rank: int, world: int, n_kv_heads: int) -> tuple[int, ...]:
    """The shape of the part of a weight of full `shape` that `rank` of `world` holds."""
    dim = parallel_dim(key)
    if dim is None:
        return shape
    start, stop = part_range(key, shape[dim], rank, world, n_kv_heads)
    return shape[:dim] + (stop - start,) + shape[dim + 1 :]


def parallel_size_problem(args: ModelArgs, world: int) -> str | None:
    """Why the model cannot be split over `world` ranks, or None if it can."""
    n_kv_heads = kv_heads(args)
    if args.n_heads % world:
        return f"n_heads ({args.n_heads}) is not divisible by {world}"
    if world <= n_kv_heads and n_kv_heads % world:
        return f"n_kv_heads ({n_kv_heads}) is not divisible by {world}"
    if world > n_kv_heads and world % n_kv_heads:
        return f"{world} is not a multiple of n_kv_heads ({n_kv_heads}), so KV heads cannot be shared out evenly"
    widths = {"dim": args.dim, "vocab_size": args.vocab_size, "the feed-forward width": ffn_hidden_dim(args)}
    for name, size in widths.items():
        if size % world:
            return f"{name} ({size}) is not divisible by {world}"
    return None


def check_model_parallel_size(args: ModelArgs, world: int) -> None:
    problem = parallel_size_problem(args, world)
    if problem is not None:
        sizes = [str(w) for w in range(1, args.n_heads + 1) if parallel_size_problem(args, w) is None]
        raise ValueError(
            f"this model cannot be split over {world} model-parallel processes: {problem}. "
            f"It can run on {', '.join(sizes)}"
        )


class Checkpoint(Protocol):
    """A checkpoint folder, read one rank's part of one weight at a time, in Meta's key names."""

    folder: Path
    params: dict[str, Any]  # as Meta's params.json, to write next to resharded weights
    args: ModelArgs  # with the vocabulary size filled in from the weights
    unknown_params: list[str]  # params.json keys this library does not know

    def read(self, key: str, rank: int, world: int) -> torch.Tensor:
        """Rank's part of weight `key` when the model runs on `world` ranks."""
        ...

    def release(self, tensor: torch.Tensor) -> None:
        """Say that a tensor read() returned has been copied and will not be used again."""
        ...


def find_tokenizer(folder: str | Path, tokenizer_path: str | Path | None) -> Path:
    """The tokenizer given, else tokenizer.model in the folder or beside it (where download.sh puts it)."""
    if tokenizer_path is not None:
        return Path(tokenizer_path)
    folder = Path(folder)
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no tokenizer.model in {str(folder)!r} or its parent folder: pass --tokenizer_path pointing to "
        "the tokenizer.model that came with the weights"
    )


def find_shards(ckpt_dir: str | Path) -> list[Path]:
    folder = Path(ckpt_dir)
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(
            f"no consolidated.NN.pth files (Meta's format) nor config.json (Hugging Face's) in {str(folder)!r}: "
            "pass --ckpt_dir pointing to the model folder (e.g. llama-2-7b/), not its parent"
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


def can_map(path: Path) -> bool:
    """Files written by torch < 1.6 are not zip archives and cannot be memory-mapped."""
    return zipfile.is_zipfile(path)


def load_shard(path: Path, mapped: bool) -> dict[str, torch.Tensor]:
    """Memory-map one shard (read it whole if not mapped); it is untrusted, so only tensors may be unpickled."""
    try:
        state_dict = torch.load(path, map_location="cpu", mmap=mapped, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{str(path)!r} is not a readable PyTorch checkpoint: it holds objects other than tensors, "
            "which could run code when loaded, so it was refused"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint ({err}); download it again") from err
    if not isinstance(state_dict, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state_dict).__name__}, not a dictionary of weights")
    return state_dict


class MetaCheckpoint:
    """Meta's consolidated.NN.pth shards, memory-mapped, readable as any model-parallel size.

    Opening checks every shard's names and shapes against params.json; reading then touches
    only the rows or columns a rank asks for.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.paths = find_shards(folder)
        self.params = read_params(folder)
        self.args, self.unknown_params = ModelArgs.from_params(self.params)
        mappable = [can_map(path) for path in self.paths]
        self.shards = [load_shard(path, mapped) for path, mapped in zip(self.paths, mappable)]
        if self.args.vocab_size == -1:
            # params.json may leave the vocabulary to the tokenizer; the embedding knows it.
            self.args.vocab_size = self.tensor(0, "tok_embeddings.weight").shape[0]
        self.shapes = weight_shapes(self.args)
        self.check_weights()
        # The addresses of each memory-mapped shard: the only memory release() gives back.
        self.mapped = [address_range(shard) for shard, mapped in zip(self.shards, mappable) if mapped]

    def tensor(self, index: int, key: str) -> torch.Tensor:
        value = self.shards[index].get(key)
        name = self.paths[index].name
        if value is None:
            raise ValueError(f"{name} lacks weight {key}: it does not match params.json")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: {key} holds a {type(value).__name__} where a weight tensor should be")
        return value

    def check_weights(self) -> None:
        n_shards, n_kv_heads = len(self.shards), kv_heads(self.args)
        for index, shard in enumerate(self.shards):
            name = self.paths[index].name
            found = set(shard) - IGNORED_KEYS
            missing = sorted(set(self.shapes) - found)
            unexpected = sorted(found - set(self.shapes))
            if missing:
                raise ValueError(f"{name} lacks weight(s) {', '.join(missing[:5])}: it does not match params.json")
            if unexpected:
                raise ValueError(
                    f"{name} has unexpected weight(s) {', '.join(unexpected[:5])}: it does not match params.json"
                )
            for key, shape in self.shapes.items():
                found_shape = tuple(self.tensor(index, key).shape)
                expected = part_shape(key, shape, index, n_shards, n_kv_heads)
                if found_shape != expected:
                    which = f" for shard {index} of {n_shards}" if n_shards > 1 else ""
                    raise ValueError(
                        f"{name}: weight {key} has shape {found_shape} but params.json implies {expected}{which}"
                    )

    def read(self, key: str, rank: int, world: int) -> torch.Tensor:
        """Rank's part of weight `key`, cut from the shards that hold it (merging or splitting).

        A part that one shard holds whole stays a view of the memory-mapped file; only parts
        pieced together from several shards, or cut across rows, are copied.
        """
        dim = parallel_dim(key)
        if dim is None:
            return self.shards[0][key]
        n_kv_heads, size = kv_heads(self.args), self.shapes[key][dim]
        position, stop = part_range(key, size, rank, world, n_kv_heads)
        pieces = []
        for index, shard in enumerate(self.shards):
            held_start, held_stop = part_range(key, size, index, len(self.shards), n_kv_heads)
            if held_start <= position < held_stop:
                end = min(stop, held_stop)
                pieces.append(shard[key].narrow(dim, position - held_start, end - position))
                position = end
            if position == stop:
                break
        part = pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim=dim)
        if part is not pieces[0]:
            for piece in pieces:
                self.release(piece)
        return part

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the tensor's pages from memory if it is a view of a mapped shard (see release_pages)."""
        extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
        start = tensor.data_ptr()
        end = start + extent * tensor.element_size()
        if tensor.numel() > 0 and any(low <= start and end <= high for low, high in self.mapped):
            release_pages(start, end)


def open_checkpoint(ckpt_dir: str | Path) -> Checkpoint:
    """Meta's layout (consolidated.NN.pth + params.json) or Hugging Face's (config.json + safetensors)."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {str(folder)!r} does not exist: pass --ckpt_dir pointing to a folder "
            "such as llama-2-7b/ that holds consolidated.00.pth and params.json"
        )
    if (folder / "config.json").is_file() and not any(folder.glob("consolidated.*.pth")):
        from llama.convert import HuggingFaceCheckpoint

        return HuggingFaceCheckpoint(folder)
    return MetaCheckpoint(folder)


class RankWeights(Mapping[str, torch.Tensor]):
    """One rank's part of every weight, read from the checkpoint only when asked for."""

    def __init__(self, checkpoint: Checkpoint, rank: int, world: int):
        self.checkpoint, self.rank, self.world = checkpoint, rank, world
        self.shapes = weight_shapes(checkpoint.args)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        return self.checkpoint.read(key, self.rank, self.world)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def count_parameters(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


class Progress:
    """A line on stderr about every tenth of the way ("loading weights: 8/32 layers").

    Shown on rank 0 only, and only for work on enough parameters to take a while.
    """

    def __init__(self, what: str, total: int, unit: str, n_parameters: int):
        self.what, self.total, self.unit = what, total, unit
        self.show = is_main_process() and n_parameters >= PROGRESS_MIN_PARAMETERS
        self.done = 0

    def advance(self) -> None:
        self.done += 1
        if self.show and self.done * 10 // self.total != (self.done - 1) * 10 // self.total:
            print(f"{self.what}: {self.done}/{self.total} {self.unit}", file=sys.stderr, flush=True)


def layer_of(key: str) -> str | None:
    """The transformer layer a weight belongs to ("layers.3"); None for the embedding, norm and output."""
    return ".".join(key.split(".")[:2]) if key.startswith("layers.") else None


def by_layer(keys: Iterable[str]) -> Iterator[tuple[str | None, list[str]]]:
    """Consecutive keys grouped by `layer_of`."""
    for layer, group in itertools.groupby(keys, key=layer_of):
        yield layer, list(group)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs on its device; activations come on top but are small when decoding."""

    weights: int  # its share of the weights, in the runtime dtype
    kv_cache: int  # its KV cache for max_batch_size sequences of max_seq_len tokens

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def rank_shapes(args: ModelArgs, rank: int, world: int) -> dict[str, tuple[int, ...]]:
    """The shape of every weight that `rank` of `world` holds."""
    n_kv_heads = kv_heads(args)
    return {key: part_shape(key, shape, rank, world, n_kv_heads) for key, shape in weight_shapes(args).items()}


def estimate_memory(args: ModelArgs, rank: int, world: int, dtype: torch.dtype) -> MemoryEstimate:
    weights = count_parameters(rank_shapes(args, rank, world))
    head_dim, n_kv_heads = args.dim // args.n_heads, kv_heads(args)
    start, stop = part_range("attention.wk.weight", n_kv_heads * head_dim, rank, world, n_kv_heads)
    kv_cache = 2 * args.n_layers * args.max_batch_size * args.max_seq_len * (stop - start)
    return MemoryEstimate(weights * dtype.itemsize, kv_cache * dtype.itemsize)


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(args: ModelArgs, rank: int, world: int, runtime: Runtime, available: int | None) -> None:
    """Refuse, before anything is allocated, a model whose share will not fit this rank's device.

    `available` is what the device has free (None: unknown, so nothing is checked). The message
    gives the numbers and the largest limits, or the smallest process count, that would fit.
    """
    need = estimate_memory(args, rank, world, runtime.dtype)
    if available is None or need.total <= available:
        return
    advice = []
    room = available - need.weights
    per_token = need.kv_cache // (args.max_batch_size * args.max_seq_len)
    if room >= per_token * args.max_seq_len:
        advice.append(f"max_batch_size {room // (per_token * args.max_seq_len)}")
    elif room >= per_token:
        advice.append(f"max_batch_size 1 with max_seq_len {room // per_token}")
    more = (
        w
        for w in range(world + 1, args.n_heads + 1)
        if parallel_size_problem(args, w) is None and estimate_memory(args, 0, w, runtime.dtype).total <= available
    )
    processes = next(more, None)
    if processes is not None:
        advice.append(f"{processes} model-parallel processes (on more GPUs or machines)")
    raise ValueError(
        f"this process needs about {format_bytes(need.total)} on {runtime.device} but only "
        f"{format_bytes(available)} is available: {format_bytes(need.weights)} for its share of the weights "
        f"in {str(runtime.dtype).removeprefix('torch.')} and {format_bytes(need.kv_cache)} for the KV cache of "
        f"max_batch_size {args.max_batch_size} x max_seq_len {args.max_seq_len}. "
        + (f"What would fit: {', or '.join(advice)}" if advice else "Use a device with more memory")
    )


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    runtime: Runtime,
    progress: Progress | None = None,
    release: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """Move each checkpoint tensor into the model, cast once, after checking names and shapes.

    Parameters are replaced rather than copied into, so a memory-mapped CPU shard in the target
    dtype becomes the model's storage without a second copy. Weights move one layer at a time:
    a lazily read `state_dict` then never has more than a layer in flight. Each tensor that had
    to be copied is passed to `release`, so its pages need not stay in memory.
    """
    expected = model.state_dict()
    found = [key for key in state_dict if key not in IGNORED_KEYS]
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise ValueError(f"checkpoint lacks weight(s) {', '.join(missing[:5])}: it does not match params.json")
    if unexpected:
        raise ValueError(
            f"checkpoint has unexpected weight(s) {', '.join(unexpected[:5])}: it does not match params.json"
        )
    for layer, keys in by_layer(expected):
        part = {}
        for key in keys:
            tensor = state_dict[key]
            if tensor.shape != expected[key].shape:
                raise ValueError(
                    f"weight {key} has shape {tuple(tensor.shape)} but params.json implies "
                    f"{tuple(expected[key].shape)} for this model-parallel rank"
                )
            part[key] = tensor.to(device=runtime.device, dtype=runtime.dtype)
            if release is not None and part[key] is not tensor:
                release(tensor)
        model.load_state_dict(part, assign=True, strict=False)
        if layer is not None and progress is not None:
            progress.advance()


def release_pages(start: int, end: int) -> None:
    """Drop the whole pages between two addresses of a memory-mapped checkpoint from memory.

    They would otherwise stay resident until the whole file is unmapped, so a load that copies
    (Meta's bf16 weights cast to fp32 for a CPU, say) would hold both. The file is mapped
    privately and never written to, so a dropped page is read again from it if touched. Best
    effort, Linux only: elsewhere the pages go when the file is unmapped.
    """
    if LIBC is None:
        return
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def address_range(shard: dict[str, torch.Tensor]) -> tuple[int, int]:
    """The lowest and highest address of a loaded shard's tensors."""
    storages = [t.untyped_storage() for t in shard.values() if isinstance(t, torch.Tensor) and t.numel() > 0]
    return min(s.data_ptr() for s in storages), max(s.data_ptr() + s.nbytes() for s in storages)


def check_vocabulary(tokenizer: Tokenizer, args: ModelArgs) -> None:
    """A tokenizer that does not match the embedding would silently produce garbage."""
    if args.vocab_size != tokenizer.n_words:
        raise ValueError(
            f"the tokenizer has {tokenizer.n_words} tokens but the checkpoint's embedding has "
            f"{args.vocab_size} rows: use the tokenizer.model that was distributed with these weights"
        )


def load_model(
    ckpt_dir: str | Path, tokenizer: Tokenizer, runtime: Runtime, max_seq_len: int, max_batch_size: int
) -> Transformer:
    """This rank's part of the model, on the runtime's device and in its dtype, with its KV cache.

    Any shard count loads on any model-parallel size: each rank reads just its rows or columns
    from the memory-mapped shards, after checking that its share and KV cache fit the device.
    """
    checkpoint = open_checkpoint(ckpt_dir)
    if checkpoint.unknown_params and is_main_process():
        warnings.warn(
            f"{checkpoint.folder / 'params.json'}: ignoring unknown key(s) {', '.join(checkpoint.unknown_params)}",
            stacklevel=3,
        )
    args = replace(checkpoint.args, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    check_vocabulary(tokenizer, args)
    world, rank = fs_init.get_model_parallel_world_size(), fs_init.get_model_parallel_rank()
    check_model_parallel_size(args, world)
    check_memory(args, rank, world, runtime, available_memory(runtime.device))

    # A one-token cache for now: the real one is allocated on the device, next to the weights.
    model = Transformer(replace(args, max_seq_len=1, max_batch_size=1))
    progress = Progress("loading weights", args.n_layers, "layers", count_parameters(rank_shapes(args, rank, world)))
    load_weights(model, RankWeights(checkpoint, rank, world), runtime, progress, release=checkpoint.release)
    model.requires_grad_(False)
    model.setup_caches(max_batch_size, max_seq_len)
    return model


def split_state_dict(state_dict: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """Cut a one-shard state dict into `parts` model-parallel shards (at most one per KV head)."""
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
    """Join model-parallel shards (at most one per KV head) back into one state dict."""
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


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor with a storage of its own size: torch.save writes a view's whole underlying storage."""
    owns_storage = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes
    return tensor if owns_storage else tensor.clone()


def save_checkpoint(folder: str | Path, shards: Iterable[dict[str, torch.Tensor]], params: dict[str, Any]) -> None:
    """Write Meta's layout: consolidated.NN.pth, params.json and checklist.chk (md5sum format).

    Shards may come from a generator, so that only one is in memory at a time.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for shard in shards:  # not enumerate(): its cached result tuple would keep the last shard alive
        name = f"consolidated.{len(names):02d}.pth"
        torch.save({key: compact(tensor) for key, tensor in shard.items()}, folder / name)
        names.append(name)
        del shard  # free it before the next one is built
    (folder / "params.json").write_text(json.dumps(params) + "\n")
    names.append("params.json")
    checklist = "".join(f"{md5sum(folder / name)}  {name}\n" for name in names)
    (folder / "checklist.chk").write_text(checklist)


def new_folder(dst: str | Path, src: str | Path) -> Path:
    """An empty output folder, so no stale shard from an earlier run is left beside the new ones."""
    dst = Path(dst)
    if dst.resolve() == Path(src).resolve():
        raise ValueError(f"the output folder {str(dst)!r} is the input folder: choose a new one")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{str(dst)!r} already exists and is not an empty folder: choose a new one")
    dst.mkdir(parents=True, exist_ok=True)
    return dst


def reshard(src: str | Path, dst: str | Path, model_parallel_size: int) -> None:
    """Write any checkpoint `Llama.build` reads in Meta's layout, cut for `model_parallel_size` processes.

    Output shards are built one at a time from the memory-mapped source, so memory in use stays
    near one output shard. A tokenizer.model in the source folder is copied along.
    """
    if not isinstance(model_parallel_size, int) or model_parallel_size < 1:
        raise ValueError(f"model_parallel_size must be a positive integer, got {model_parallel_size!r}")
    checkpoint = open_checkpoint(src)
    args = checkpoint.args
    check_model_parallel_size(args, model_parallel_size)
    dst = new_folder(dst, src)
    n_parameters = count_parameters(weight_shapes(args))
    progress = Progress(
        f"writing {model_parallel_size} shard(s)", model_parallel_size * args.n_layers, "layers", n_parameters
    )

    def shards() -> Iterator[dict[str, torch.Tensor]]:
        for rank in range(model_parallel_size):
            # Opened afresh for each shard, so the pages mapped while cutting one are let go before the next.
            source, shard = open_checkpoint(src), {}
            for layer, keys in by_layer(weight_shapes(args)):
                shard.update((key, source.read(key, rank, model_parallel_size)) for key in keys)
                if layer is not None:
                    progress.advance()
            yield shard

    save_checkpoint(dst, shards(), checkpoint.params)
    tokenizer = checkpoint.folder / "tokenizer.model"
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, dst / "tokenizer.model")


def weight_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight of the unsharded model and its shape, in Meta's key names and the model's order."""
    head_dim = args.dim // args.n_heads
    n_kv_heads = kv_heads(args)
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
