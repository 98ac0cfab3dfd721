"""Write a quantized copy of a checkpoint, in Meta's layout.

    python -m llama.quantize llama-2-7b/ llama-2-7b-int8/ --quantize int8

Each linear weight becomes NAME.qweight (the integers) and NAME.scales (fp32), params.json
records the scheme, and checklist.chk lists the files. Llama.build loads the copy without
quantizing again, on any number of processes whose split keeps groups whole; it reads a
quarter (int8) or an eighth (int4) of an fp32 checkpoint's bytes.
"""

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from llama.checkpoint import MetaCheckpoint, Progress, by_layer, save_checkpoint
from llama.cli import run_script
from llama.loading import QuantizingWeights, RankWeights, open_checkpoint
from llama.model import num_parameters
from llama.parallel import check_model_parallel_size, model_parallel_sizes
from llama.quantization import Scheme, check_groups, parse_scheme, quantized_bytes, quantized_layout
from llama.writing import new_folder


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    quantize: str | Scheme,
    model_parallel_size: int | None = None,
    show_progress: bool | None = None,
) -> None:
    """Write SRC (any format Llama.build reads) quantized to the new folder DST.

    Shards are written one at a time, each weight quantized as it is read from the memory-mapped
    source, so memory in use stays near one output shard. model_parallel_size defaults to the
    source's shard count; a tokenizer.model in the source folder is copied along.
    """
    scheme = quantize if isinstance(quantize, Scheme) else parse_scheme(quantize)
    if scheme is None:
        raise ValueError("--quantize none leaves the weights as they are: use int8 or int4 (see --help)")
    checkpoint = open_checkpoint(src)
    if checkpoint.scheme is not None:
        raise ValueError(
            f"{str(checkpoint.folder)!r} is quantized as {checkpoint.scheme.name} already, and quantizing again "
            "would lose more: quantize the original checkpoint instead"
        )
    args = checkpoint.args
    world = model_parallel_size or (len(checkpoint.paths) if isinstance(checkpoint, MetaCheckpoint) else 1)
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"model_parallel_size must be a positive integer, got {model_parallel_size!r}")
    check_model_parallel_size(args, world)
    check_groups(checkpoint.layout, scheme, world, model_parallel_sizes(args))
    layout = quantized_layout(checkpoint.layout, scheme)
    n_parameters = num_parameters(args)
    progress = Progress(f"quantizing {world} shard(s)", world * args.n_layers, "layers", n_parameters, show_progress)

    def shards() -> Iterator[dict[str, torch.Tensor]]:
        for rank in range(world):
            # Opened afresh for each shard, so the pages mapped while cutting one are let go before the next.
            source = open_checkpoint(src)
            weights, shard = QuantizingWeights(RankWeights(source, rank, world), scheme, source.release), {}
            for layer, keys in by_layer(layout):
                shard.update((key, weights[key]) for key in keys)
                if layer is not None:
                    progress.advance()
            yield shard

    itemsize = checkpoint.read("norm.weight", 0, 1).element_size()
    needed = world * quantized_bytes(checkpoint.layout, scheme, world, itemsize) + (1 << 20)
    with new_folder(dst, src, needed) as folder:
        save_checkpoint(folder, shards(), {**checkpoint.params, "quantization": scheme.params})
        tokenizer = checkpoint.folder / "tokenizer.model"
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, folder / "tokenizer.model")


def main(src: str, dst: str, quantize: str = "int8", model_parallel_size: int | None = None) -> None:
    """Write SRC quantized (--quantize int8, int4 or int4:gN: groups of N input features, default 64)
    to the new folder DST, as --model_parallel_size shards (default: as many as SRC has)."""
    quantize_checkpoint(src, dst, quantize, model_parallel_size)
    print(f"wrote {dst}, quantized as {parse_scheme(quantize).name}")


if __name__ == "__main__":
    run_script(main)
