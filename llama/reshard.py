"""Cut a checkpoint into another number of shards on disk, in Meta's layout.

    python -m llama.reshard llama-2-13b/ llama-2-13b-mp1/ --model-parallel-size 1

Llama.build already merges or splits shards as it loads; a resharded copy saves that work on
every start, and runs under Meta's reference code too, which needs one shard per process.
"""

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from llama.checkpoint import Progress, by_layer, save_checkpoint, written_bytes
from llama.cli import run_script
from llama.loading import open_checkpoint
from llama.model import num_parameters, weight_layout
from llama.parallel import check_model_parallel_size, model_parallel_sizes
from llama.quantization import check_groups
from llama.writing import new_folder


def reshard(src: str | Path, dst: str | Path, model_parallel_size: int, show_progress: bool | None = None) -> None:
    """Write any checkpoint `Llama.build` reads in Meta's layout, cut for `model_parallel_size` processes.

    Output shards are built one at a time from the memory-mapped source, so memory in use stays
    near one output shard. A tokenizer.model in the source folder is copied along.
    """
    if not isinstance(model_parallel_size, int) or model_parallel_size < 1:
        raise ValueError(f"model_parallel_size must be a positive integer, got {model_parallel_size!r}")
    checkpoint = open_checkpoint(src)
    args = checkpoint.args
    check_model_parallel_size(args, model_parallel_size)
    if checkpoint.scheme is not None:
        check_groups(weight_layout(args), checkpoint.scheme, model_parallel_size, model_parallel_sizes(args))
    progress = Progress(
        f"writing {model_parallel_size} shard(s)",
        model_parallel_size * args.n_layers,
        "layers",
        num_parameters(args),
        show_progress,
    )

    def shards() -> Iterator[dict[str, torch.Tensor]]:
        for rank in range(model_parallel_size):
            # Opened afresh for each shard, so the pages mapped while cutting one are let go before the next.
            source, shard = open_checkpoint(src), {}
            for layer, keys in by_layer(checkpoint.layout):
                shard.update((key, source.read(key, rank, model_parallel_size)) for key in keys)
                if layer is not None:
                    progress.advance()
            yield shard

    with new_folder(dst, src, written_bytes(checkpoint, model_parallel_size)) as folder:
        save_checkpoint(folder, shards(), checkpoint.params)
        tokenizer = checkpoint.folder / "tokenizer.model"
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, folder / "tokenizer.model")


def main(src: str, dst: str, model_parallel_size: int) -> None:
    """Write SRC (Meta's or Hugging Face's format) to the new folder DST as model_parallel_size shards."""
    reshard(src, dst, model_parallel_size)
    print(f"wrote {model_parallel_size} shard(s) and checklist.chk to {dst}")


if __name__ == "__main__":
    run_script(main)
