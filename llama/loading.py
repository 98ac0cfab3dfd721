"""From a checkpoint folder to a model ready to run: open, check, build empty, assign, allocate.

The network is built on the meta device (no memory), checked against the device's free memory,
then each weight is assigned from the memory-mapped checkpoint, one layer at a time, in the
runtime's device and dtype. On a CPU those still views of the file then move, one at a time,
into memory of the process's own in 2 MiB pages (see into_large_pages). Only then is the KV cache
allocated, once, where the weights are.
"""

import mmap
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from fairscale.nn.model_parallel import initialize as fs_init
from torch import nn

from llama.checkpoint import IGNORED_KEYS, Checkpoint, MetaCheckpoint, Progress, by_layer, check_weight_names
from llama.checkpoint import verify as verify_files
from llama.kernels import use_kernels
from llama.memory import available_memory, check_memory
from llama.model import ModelArgs, Transformer, num_parameters, weight_layout
from llama.parallel import check_model_parallel_size, model_parallel_sizes
from llama.quantization import (
    Scheme,
    check_groups,
    convert,
    parse_scheme,
    prepare_kernels,
    quantize,
    quantized_layout,
    row_amax,
)
from llama.runtime import Runtime, is_main_process
from llama.tokenizer import Tokenizer


def find_tokenizer(folder: str | Path, tokenizer_path: str | Path | None) -> Path:
    """The tokenizer given, else tokenizer.model in the folder or beside it (where download.sh puts it)."""
    if tokenizer_path is not None:
        return Path(tokenizer_path)
    folder = check_folder(folder)
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no tokenizer.model in {str(folder)!r} or its parent folder: pass --tokenizer_path pointing to "
        "the tokenizer.model that came with the weights"
    )


def check_folder(ckpt_dir: str | Path) -> Path:
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {str(folder)!r} does not exist: pass --ckpt_dir pointing to a folder "
            "such as llama-2-7b/ that holds consolidated.00.pth and params.json"
        )
    return folder


def open_checkpoint(ckpt_dir: str | Path) -> Checkpoint:
    """Meta's layout (consolidated.NN.pth + params.json) or Hugging Face's (config.json + safetensors)."""
    folder = check_folder(ckpt_dir)
    if (folder / "config.json").is_file() and not any(folder.glob("consolidated.*.pth")):
        from llama.hf import HuggingFaceCheckpoint  # safetensors, an optional dependency

        return HuggingFaceCheckpoint(folder)
    return MetaCheckpoint(folder)


class RankWeights(Mapping[str, torch.Tensor]):
    """One rank's part of every weight, read from the checkpoint only when asked for."""

    def __init__(self, checkpoint: Checkpoint, rank: int, world: int):
        self.checkpoint, self.rank, self.world = checkpoint, rank, world

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.checkpoint.layout:
            raise KeyError(key)
        return self.checkpoint.read(key, self.rank, self.world)

    def __iter__(self) -> Iterator[str]:
        return iter(self.checkpoint.layout)

    def __len__(self) -> int:
        return len(self.checkpoint.layout)


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    runtime: Runtime,
    progress: Progress | None = None,
    release: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """Move each checkpoint tensor into the model, cast once, after checking names and shapes.

    Parameters are replaced rather than copied into, so a memory-mapped CPU shard in the target
    dtype becomes the model's storage without a second copy, and a model built on the meta
    device gets real weights. Weights move one layer at a time: a lazily read `state_dict` then
    never has more than a layer in flight. Each tensor that had to be copied is passed to
    `release`, so its pages need not stay in memory.
    """
    expected = model.state_dict()
    parameters = {name for name, _ in model.named_parameters()}
    check_weight_names((key for key in state_dict if key not in IGNORED_KEYS), expected, "checkpoint", "params.json")
    for layer, keys in by_layer(expected):
        part = {}
        for key in keys:
            tensor = state_dict[key]
            if tensor.shape != expected[key].shape:
                raise ValueError(
                    f"weight {key} has shape {tuple(tensor.shape)} but params.json implies "
                    f"{tuple(expected[key].shape)} for this model-parallel rank"
                )
            # Parameters take the runtime's dtype; a quantized layer's integers and fp32 scales keep theirs.
            dtype = runtime.dtype if key in parameters else expected[key].dtype
            part[key] = tensor.to(device=runtime.device, dtype=dtype)
            if release is not None and part[key] is not tensor:
                release(tensor)
        model.load_state_dict(part, assign=True, strict=False)
        if layer is not None and progress is not None:
            progress.advance()


def check_vocabulary(tokenizer: Tokenizer, args: ModelArgs) -> None:
    """A tokenizer that does not match the embedding would silently produce garbage."""
    if args.vocab_size != tokenizer.n_words:
        raise ValueError(
            f"the tokenizer has {tokenizer.n_words} tokens but the checkpoint's embedding has "
            f"{args.vocab_size} rows: use the tokenizer.model that was distributed with these weights"
        )


def load_model(
    ckpt_dir: str | Path,
    tokenizer: Tokenizer,
    runtime: Runtime,
    max_seq_len: int,
    max_batch_size: int,
    available: int | None = None,
    show_progress: bool | None = None,
    verify: bool = False,
    quantize: str | Scheme | None = None,
) -> Transformer:
    """This rank's part of the model, on the runtime's device and in its dtype, with its KV cache.

    Any shard count loads on any model-parallel size: each rank reads just its rows or columns
    from the memory-mapped shards, after checking that its share and KV cache fit the device
    (`available` bytes; by default what the device reports free). verify first checks the files
    against checklist.chk, the ranks sharing the reading. quantize ("int8", "int4:g32", ...)
    quantizes each weight as it is read (see llama.quantization); a quantized checkpoint loads
    as it was made.
    """
    world, rank = fs_init.get_model_parallel_world_size(), fs_init.get_model_parallel_rank()
    checkpoint = open_checkpoint(ckpt_dir)
    if verify:
        verify_files(checkpoint.folder, rank, world)
    if checkpoint.unknown_params and is_main_process():
        warnings.warn(
            f"{checkpoint.folder / 'params.json'}: ignoring unknown key(s) {', '.join(checkpoint.unknown_params)}",
            stacklevel=3,
        )
    scheme = quantization_scheme(checkpoint, quantize)
    args = replace(checkpoint.args, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    check_vocabulary(tokenizer, args)
    check_model_parallel_size(args, world)
    if scheme is not None:
        check_groups(weight_layout(args), scheme, world, model_parallel_sizes(args))
    check_memory(args, world, runtime, available_memory(runtime.device) if available is None else available, scheme)

    with torch.device("meta"):
        model = Transformer(args, world)
        if scheme is not None:
            convert(model, scheme)
    weights = RankWeights(checkpoint, rank, world)
    if scheme is not None and checkpoint.scheme is None:
        weights = QuantizingWeights(weights, scheme, checkpoint.release)
    progress = Progress("loading weights", args.n_layers, "layers", num_parameters(args) // world, show_progress)
    load_weights(model, weights, runtime, progress, release=checkpoint.release)
    if scheme is not None:
        prepare_kernels(model)
    if runtime.device.type == "cpu" and checkpoint.scheme is None and sys.platform == "linux":
        into_large_pages(model, checkpoint)
    use_kernels(model)
    model.requires_grad_(False)
    model.setup_caches()
    return model


LARGE_PAGE = 2 * 2**20
CACHE_LINE = 64  # bytes: each weight starts on one of its own


def into_large_pages(model: Transformer, checkpoint: Checkpoint) -> None:
    """Move the weights of a CPU model that are views of the memory-mapped checkpoint (Meta's
    files, fp32 or bf16, loaded in their own dtype), all but the embedding table, into one block of
    anonymous memory that Linux is asked to back with 2 MiB pages (transparent huge pages).

    A decode step on a CPU reads every weight from memory, and reads it faster from 2 MiB pages
    than from a mapped file's 4 KiB ones; the price is a copy when loading, and the kernel's work
    to find the large pages (docs/benchmarks.md has both). Each weight gives back its file pages
    once copied, so the process holds the weights once, and one weight more. Weights the loading
    made (cast, quantized, pieced from shards, or read from safetensors) stay where they are,
    since the allocator would keep their old memory; so does a quantized file (the caller's
    choice). Where the kernel offers no large pages the block is plain memory.
    """
    embedding = model.tok_embeddings.weight  # a step reads one row of it
    state = model.state_dict(keep_vars=True)
    weights = {name: t for name, t in state.items() if t is not embedding and checkpoint.is_mapped(t)}
    offsets, size = {}, 0
    for name, tensor in weights.items():
        offsets[name] = size
        size += -(-tensor.nbytes // CACHE_LINE) * CACHE_LINE
    if size == 0:
        return
    block = mmap.mmap(-1, size + LARGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        block.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without transparent huge pages
        pass
    memory = torch.frombuffer(block, dtype=torch.uint8)  # its views keep the block alive
    start = -memory.data_ptr() % LARGE_PAGE
    moved = {}
    with torch.no_grad():
        for name, tensor in weights.items():
            at = start + offsets[name]
            moved[name] = memory[at : at + tensor.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
            checkpoint.release(tensor)
    model.load_state_dict(moved, assign=True, strict=False)


def quantization_scheme(checkpoint: Checkpoint, quantize: str | Scheme | None) -> Scheme | None:
    """What the model is quantized as: what was asked, or what a quantized checkpoint was made as."""
    asked = quantize if isinstance(quantize, Scheme | None) else parse_scheme(quantize)
    made = checkpoint.scheme
    if made is not None and asked is not None and asked != made:
        raise ValueError(
            f"{str(checkpoint.folder)!r} is quantized as {made.name} already: leave --quantize out to load it as it "
            f"is, or quantize the unquantized checkpoint as {asked.name} instead"
        )
    return asked or made


class QuantizingWeights(Mapping[str, torch.Tensor]):
    """A rank's weights, each linear one quantized as it is read: the full-precision model never
    exists in memory, only one weight of it at a time."""

    def __init__(self, weights: RankWeights, scheme: Scheme, release: Callable[[torch.Tensor], None]):
        self.weights, self.scheme, self.release = weights, scheme, release
        self.layout = quantized_layout(weights.checkpoint.layout, scheme)
        self.waiting: dict[str, torch.Tensor] = {}  # the other half of a weight asked for once

    def __getitem__(self, key: str) -> torch.Tensor:
        base, _, kind = key.rpartition(".")
        if kind not in ("qweight", "scales"):
            return self.weights[key]
        if key in self.waiting:
            return self.waiting.pop(key)
        weight = self.weights[f"{base}.weight"]
        q, scales = quantize(weight, self.scheme, self.whole_row_amax(f"{base}.weight"))
        self.release(weight)
        if kind == "qweight":
            self.waiting[f"{base}.scales"] = scales
            return q
        self.waiting[f"{base}.qweight"] = q
        return scales

    def whole_row_amax(self, key: str) -> torch.Tensor | None:
        """int8's scales of a weight whose columns are split over ranks come from its whole rows,
        so that every process count quantizes it alike; None where this rank holds whole rows."""
        if self.scheme.bits != 8 or self.weights.checkpoint.layout[key].dim != 1 or self.weights.world == 1:
            return None
        whole = self.weights.checkpoint.read(key, 0, 1)
        amax = row_amax(whole)
        self.release(whole)
        return amax

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout)

    def __len__(self) -> int:
        return len(self.layout)
