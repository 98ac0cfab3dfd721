"""Convert between Hugging Face's Llama format (config.json + safetensors) and Meta's.

    python -m llama.convert llama-2-7b/ llama-2-7b-hf/    # Meta -> Hugging Face
    python -m llama.convert llama-2-7b-hf/ llama-2-7b/    # Hugging Face -> Meta (--model_parallel_size N)

The direction follows the source. Tensors keep their dtype, and the only change in layout is
the rotary row order of the query and key weights (see llama.hf), so Meta -> HF -> Meta is
bit-exact.
"""

import json
import math
import shutil
from pathlib import Path

from llama.checkpoint import Progress, by_layer, written_bytes
from llama.cli import run_script
from llama.hf import (
    INDEX_FILE,
    MODEL_FILE,
    ROTARY_WEIGHTS,
    HuggingFaceCheckpoint,
    config_from_args,
    hf_name,
    interleaved_to_halves,
    save_safetensors,
    tokenizer_config,
)
from llama.loading import check_vocabulary, find_tokenizer, open_checkpoint
from llama.model import num_parameters
from llama.reshard import reshard
from llama.tokenizer import Tokenizer
from llama.writing import new_folder


def plan_files(shapes: dict[str, tuple[int, ...]], itemsize: int, max_file_bytes: int) -> list[list[str]]:
    """Weight keys per safetensors file: whole layers in order, a new file once one would grow past the limit."""
    files: list[list[str]] = [[]]
    size = 0
    for _, keys in by_layer(shapes):
        layer_bytes = sum(math.prod(shapes[key]) for key in keys) * itemsize
        if files[-1] and size + layer_bytes > max_file_bytes:
            files.append([])
            size = 0
        files[-1].extend(keys)
        size += layer_bytes
    return files


def to_hugging_face(
    src: str | Path,
    dst: str | Path,
    tokenizer_path: str | Path | None = None,
    max_file_bytes: int = 5 << 30,
    show_progress: bool | None = None,
) -> None:
    """Write a checkpoint (any shard count) as a Hugging Face folder that LlamaForCausalLM loads.

    Tensors keep their dtype. Files are written one at a time (model.safetensors, or
    model-0000N-of-0000M.safetensors with an index past `max_file_bytes`), so memory in use
    stays near one file.
    """
    checkpoint = open_checkpoint(src)
    if checkpoint.scheme is not None:
        raise ValueError(
            f"{str(checkpoint.folder)!r} is quantized as {checkpoint.scheme.name}, which Hugging Face's Llama "
            "format cannot hold: convert the original checkpoint instead"
        )
    args = checkpoint.args
    tokenizer_path = find_tokenizer(checkpoint.folder, tokenizer_path)
    tokenizer = Tokenizer(str(tokenizer_path))
    check_vocabulary(tokenizer, args)
    shapes = {key: split.shape for key, split in checkpoint.layout.items()}
    dtype = checkpoint.read("norm.weight", 0, 1).dtype
    files = plan_files(shapes, dtype.itemsize, max_file_bytes)
    count = len(files)
    names = [MODEL_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    n_parameters = num_parameters(args)
    progress = Progress("writing Hugging Face weights", args.n_layers, "layers", n_parameters, show_progress)
    weight_map = {}
    with new_folder(dst, src, written_bytes(checkpoint, 1)) as folder:
        for name, keys in zip(names, files):
            # Opened afresh for each file, so the pages mapped while writing one are let go before the next.
            source, tensors = open_checkpoint(src), {}
            for layer, layer_keys in by_layer(keys):
                for key in layer_keys:
                    tensor = source.read(key, 0, 1)
                    if key.endswith(ROTARY_WEIGHTS):
                        tensor = interleaved_to_halves(tensor, args.head_dim)
                    tensors[hf_name(key)] = tensor.contiguous()
                if layer is not None:
                    progress.advance()
            save_safetensors(tensors, folder / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if len(names) > 1:
            index = {
                "metadata": {"total_size": n_parameters * dtype.itemsize},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (folder / "config.json").write_text(json.dumps(config_from_args(args, dtype, tokenizer), indent=2) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer), indent=2) + "\n")
        shutil.copyfile(tokenizer_path, folder / "tokenizer.model")


def main(
    src: str,
    dst: str,
    model_parallel_size: int | None = None,
    tokenizer_path: str | None = None,
    max_file_gb: float = 5.0,
) -> None:
    """Convert SRC into the other format in the new folder DST.

    Meta's folder becomes Hugging Face's (tokenizer.model is taken from --tokenizer_path, SRC or
    its parent; files of at most --max_file_gb); Hugging Face's becomes Meta's, cut into
    --model_parallel_size shards (default 1).
    """
    if isinstance(open_checkpoint(src), HuggingFaceCheckpoint):
        reshard(src, dst, model_parallel_size or 1)
        print(f"wrote Meta's format with {model_parallel_size or 1} shard(s) to {dst}")
    elif model_parallel_size is not None:
        raise ValueError("--model_parallel_size applies when writing Meta's format: a Hugging Face folder is not cut")
    else:
        to_hugging_face(src, dst, tokenizer_path, int(max_file_gb * 2**30))
        print(f"wrote Hugging Face's format to {dst}")


if __name__ == "__main__":
    run_script(main)
