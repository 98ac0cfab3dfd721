"""Cut a checkpoint into another number of shards on disk, in Meta's layout.

    python -m llama.reshard llama-2-13b/ llama-2-13b-mp1/ --model-parallel-size 1

Llama.build already merges or splits shards as it loads; a resharded copy saves that work on
every start, and runs under Meta's reference code too, which needs one shard per process.
"""

from llama.checkpoint import reshard
from llama.runtime import run_script


def main(src: str, dst: str, model_parallel_size: int) -> None:
    """Write SRC (Meta's or Hugging Face's format) to the new folder DST as model_parallel_size shards."""
    reshard(src, dst, model_parallel_size)
    print(f"wrote {model_parallel_size} shard(s) and checklist.chk to {dst}")


if __name__ == "__main__":
    run_script(main)
