"""Started by tests under torchrun: build each model given, run it, save what this rank computed.

distributed_worker.py [--compile] OUT_DIR TOKENIZER CKPT_DIR [CKPT_DIR ...]  ->  OUT_DIR/<ckpt name>-rank<r>.pt
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llama import Llama

PROMPTS = ["The cat", "A dog sat on the mat and the sun", "Red"]
TOKENS = [[1, 5, 9, 13, 20, 30, 41]]


def run(generator: Llama) -> dict:
    """The same calls, in the same order, in every process and in the single-process reference."""
    return {
        "logits": generator.model(torch.tensor(TOKENS), 0),
        "greedy": generator.text_completion(PROMPTS, max_gen_len=12, temperature=0),
        "sampled": generator.text_completion(PROMPTS, max_gen_len=12, temperature=0.8),
    }


def run_compiled(generator: Llama) -> dict:
    """Greedy decoding through the compiled decode step, whose graph holds the all-reduces:
    sequences at different positions, then one sequence."""
    compiled = Llama(generator.model, generator.tokenizer, compile=True)
    return {
        "greedy": compiled.text_completion(PROMPTS, max_gen_len=12, temperature=0),
        "greedy_first_alone": compiled.text_completion(PROMPTS[:1], max_gen_len=12, temperature=0),
    }


def build(ckpt_dir: str, tokenizer_path: str) -> Llama:
    return Llama.build(ckpt_dir, tokenizer_path, max_seq_len=48, max_batch_size=4, device="cpu")


if __name__ == "__main__":
    compile = sys.argv[1] == "--compile"
    out_dir, tokenizer_path, *ckpt_dirs = sys.argv[1 + compile :]
    for ckpt_dir in ckpt_dirs:
        generator = build(ckpt_dir, tokenizer_path)
        result = run_compiled(generator) if compile else run(generator)
        torch.save(result, f"{out_dir}/{Path(ckpt_dir).name}-rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
