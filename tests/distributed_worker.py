"""Started by tests under torchrun: build each model given, run it, save what this rank computed.

distributed_worker.py [--compile] [--quantize SCHEME] OUT_DIR TOKENIZER CKPT_DIR [CKPT_DIR ...]
    ->  OUT_DIR/<ckpt name>-rank<r>.pt
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from llama import Llama
from llama.runtime import close_process_group

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


def build(ckpt_dir: str, tokenizer_path: str, quantize: str | None = None) -> Llama:
    return Llama.build(ckpt_dir, tokenizer_path, max_seq_len=48, max_batch_size=4, device="cpu", quantize=quantize)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--quantize")
    parser.add_argument("out_dir")
    parser.add_argument("tokenizer_path")
    parser.add_argument("ckpt_dirs", nargs="+")
    options = parser.parse_args()
    for ckpt_dir in options.ckpt_dirs:
        generator = build(ckpt_dir, options.tokenizer_path, options.quantize)
        result = run_compiled(generator) if options.compile else run(generator)
        torch.save(result, f"{options.out_dir}/{Path(ckpt_dir).name}-rank{dist.get_rank()}.pt")
    close_process_group()
