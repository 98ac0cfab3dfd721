"""Meta's checkpoint layout, read and written.

A folder holds params.json and one consolidated.NN.pth per model-parallel rank, shard i holding
exactly what rank i holds in memory (see llama.parallel), plus checklist.chk with their md5
sums. `MetaCheckpoint` memory-maps the shards and serves one rank's part of one weight at a time
for any process count, merging or cutting shards as it goes; Hugging Face's layout (llama.hf)
serves the same `Checkpoint` interface. Both validate names and shapes when they are opened.
"""

import ctypes
import hashlib
import itertools
import json
import math
import mmap
import pickle
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from llama.model import ModelArgs, weight_layout
from llama.parallel import Split
from llama.params import read_params
from llama.quantization import Scheme, quantized_layout, scheme_of, stored_dtype
from llama.runtime import is_main_process

# Meta's shards carry the rotary frequencies, which the model recomputes.
IGNORED_KEYS = {"rope.freqs"}

DAMAGED = "is not a valid checkpoint file: it is corrupt or an incomplete download; download it again"

# Reading or writing this many parameters takes long enough to deserve progress lines.
PROGRESS_MIN_PARAMETERS = 10**9
LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


class Checkpoint(Protocol):
    """A checkpoint folder, read one rank's part of one weight at a time, in Meta's key names."""

    folder: Path
    params: dict[str, Any]  # as Meta's params.json, to write next to resharded weights
    args: ModelArgs  # with the vocabulary size filled in from the weights
    unknown_params: list[str]  # params.json keys this library does not know
    layout: dict[str, Split]  # every weight's name, shape and split (llama.model.weight_layout)
    scheme: Scheme | None  # how its weights are quantized (llama.quantization), None if they are not

    def read(self, key: str, rank: int, world: int) -> torch.Tensor:
        """Rank's part of weight `key` when the model runs on `world` ranks."""
        ...

    def release(self, tensor: torch.Tensor) -> None:
        """Say that a tensor read() returned has been copied and will not be used again."""
        ...

    def is_mapped(self, tensor: torch.Tensor) -> bool:
        """Whether a tensor read() returned is a view of a file mapped into memory."""
        ...


def check_weight_names(found: Iterable[str], expected: Iterable[str], where: str, described_by: str) -> None:
    """Every expected weight present and nothing else: anything else is a checkpoint of another model."""
    found, expected = set(found), set(expected)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        raise ValueError(f"{where} lacks weight(s) {', '.join(missing[:5])}: it does not match {described_by}")
    if unexpected:
        raise ValueError(
            f"{where} has unexpected weight(s) {', '.join(unexpected[:5])}: it does not match {described_by}"
        )


class Progress:
    """A line on stderr about every tenth of the way ("loading weights: 8/32 layers").

    Shown on rank 0 only; by default only for work on enough parameters to take a while.
    """

    def __init__(self, what: str, total: int, unit: str, n_parameters: int, show: bool | None = None):
        self.what, self.total, self.unit = what, total, unit
        self.show = is_main_process() and (n_parameters >= PROGRESS_MIN_PARAMETERS if show is None else show)
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


def load_shard(path: Path, mapped: bool) -> dict[str, torch.Tensor]:
    """Memory-map one shard (read it whole if not mapped); it is untrusted, so only tensors may be unpickled."""
    if path.stat().st_size == 0:
        raise ValueError(f"{str(path)!r} is empty (0 bytes): its download did not finish; download it again")
    try:
        state_dict = torch.load(path, map_location="cpu", mmap=mapped, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # a pickle that names a function to call
            raise ValueError(
                f"{str(path)!r} is not a readable PyTorch checkpoint: it holds objects other than tensors, "
                "which could run code when loaded, so it was refused"
            ) from err
        raise ValueError(f"{str(path)!r} {DAMAGED}") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{str(path)!r} {DAMAGED}") from err
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
        source = repr(str(self.folder / "params.json"))
        self.scheme = scheme_of(self.params, source)  # a quantized checkpoint's, else None
        described = {key: value for key, value in self.params.items() if key != "quantization"}
        self.args, self.unknown_params = ModelArgs.from_params(described, source)
        # Files written by torch < 1.6 are not zip archives and cannot be memory-mapped.
        mappable = [zipfile.is_zipfile(path) for path in self.paths]
        self.shards = [load_shard(path, mapped) for path, mapped in zip(self.paths, mappable)]
        if self.args.vocab_size == -1:
            # params.json may leave the vocabulary to the tokenizer; the embedding knows it.
            self.args.vocab_size = self.tensor(0, "tok_embeddings.weight").shape[0]
        self.layout = weight_layout(self.args)
        if self.scheme is not None:
            self.layout = quantized_layout(self.layout, self.scheme)
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
        n_shards = len(self.shards)
        for index, shard in enumerate(self.shards):
            name = self.paths[index].name
            check_weight_names(set(shard) - IGNORED_KEYS, self.layout, name, "params.json")
            for key, split in self.layout.items():
                tensor = self.tensor(index, key)
                found_shape, expected = tuple(tensor.shape), split.part_shape(n_shards)
                if found_shape != expected:
                    which = f" for shard {index} of {n_shards}" if n_shards > 1 else ""
                    raise ValueError(
                        f"{name}: weight {key} has shape {found_shape} but params.json implies {expected}{which}"
                    )
                dtype = None if self.scheme is None else stored_dtype(key, self.scheme)
                if (tensor.dtype != dtype) if dtype is not None else not tensor.is_floating_point():
                    wanted = "a floating-point type" if dtype is None else str(dtype).removeprefix("torch.")
                    raise ValueError(
                        f"{name}: weight {key} is {str(tensor.dtype).removeprefix('torch.')}, not {wanted}: "
                        "the file is damaged or was not written for this params.json; make it again"
                    )

    def read(self, key: str, rank: int, world: int) -> torch.Tensor:
        """Rank's part of weight `key`, cut from the shards that hold it (merging or splitting).

        A part that one shard holds whole stays a view of the memory-mapped file; only parts
        pieced together from several shards, or cut across rows, are copied.
        """
        split = self.layout[key]
        if split.dim is None:
            return self.shards[0][key]
        position, stop = split.part(rank, world)
        pieces = []
        for index, shard in enumerate(self.shards):
            held_start, held_stop = split.part(index, len(self.shards))
            if held_start <= position < held_stop:
                end = min(stop, held_stop)
                pieces.append(shard[key].narrow(split.dim, position - held_start, end - position))
                position = end
            if position == stop:
                break
        part = pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim=split.dim)
        if part is not pieces[0]:
            for piece in pieces:
                self.release(piece)
        return part

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the tensor's pages from memory if it is a view of a mapped shard (see release_pages)."""
        if self.is_mapped(tensor):
            release_pages(*extent(tensor))

    def is_mapped(self, tensor: torch.Tensor) -> bool:
        start, end = extent(tensor)
        return tensor.numel() > 0 and any(low <= start and end <= high for low, high in self.mapped)


def extent(tensor: torch.Tensor) -> tuple[int, int]:
    """The first address of a tensor's data, and the one after its last element."""
    elements = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + elements * tensor.element_size()


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


def verify(folder: str | Path, rank: int = 0, world: int = 1) -> list[str]:
    """Check the files checklist.chk lists against their md5 sums; return their names.

    Damaged tensor data can load and then give NaN or nonsense, so this is worth running on a
    new download. Rank r of `world` checks every world-th file, so a group shares the reading.
    """
    folder = Path(folder)
    checklist = folder / "checklist.chk"
    if not checklist.is_file():
        raise FileNotFoundError(
            f"no checklist.chk in {str(folder)!r}: nothing to verify against (Meta's folders have one, "
            "Hugging Face's do not)"
        )
    lines = [line.split(maxsplit=1) for line in checklist.read_text().splitlines() if line.strip()]
    if not lines or any(len(line) != 2 for line in lines):
        raise ValueError(f"{str(checklist)!r} is not a list of 'md5sum  file' lines: download it again")
    entries = [(digest.lower(), name.strip().lstrip("*")) for digest, name in lines]  # "*": md5sum's binary mode
    problems = []
    for digest, name in entries[rank::world]:
        if not (folder / name).is_file():
            problems.append(f"{name} is missing")
        elif md5sum(folder / name) != digest:
            problems.append(f"{name} does not match its md5 sum")
    if problems:
        raise ValueError(
            f"{str(folder)!r}: {'; '.join(problems)}: the files are damaged or incomplete; download them again"
        )
    return [name for _, name in entries]


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


def written_bytes(checkpoint: Checkpoint, world: int) -> int:
    """About what a copy of the checkpoint cut for `world` ranks takes on disk (KV copies included)."""
    float_itemsize = checkpoint.read("norm.weight", 0, 1).element_size()

    def itemsize(key: str) -> int:
        dtype = None if checkpoint.scheme is None else stored_dtype(key, checkpoint.scheme)
        return float_itemsize if dtype is None else dtype.itemsize

    per_rank = sum(math.prod(split.part_shape(world)) * itemsize(key) for key, split in checkpoint.layout.items())
    tokenizer = checkpoint.folder / "tokenizer.model"
    return world * per_rank + (tokenizer.stat().st_size if tokenizer.is_file() else 0) + (1 << 20)
