"""Started by tests under torchrun or plain python to fail in a chosen way, as a user's job would.

faulty_worker.py --mode stop|loop --ckpt_dir DIR --pid_dir DIR
  stop: after loading, rank 1 stops itself (SIGSTOP), as a hung peer would; rank 0 generates.
  loop: every rank generates forever, to be interrupted.
Each rank writes its pid to PID_DIR/rank<r>.pid once the model is loaded.
"""

import os
import signal
from pathlib import Path

import torch.distributed as dist

from llama import Llama
from llama.cli import run_script


def main(mode: str, ckpt_dir: str, pid_dir: str) -> None:
    generator = Llama.build(ckpt_dir, None, max_seq_len=64, max_batch_size=1, device="cpu")
    Path(pid_dir, f"rank{dist.get_rank()}.pid").write_text(str(os.getpid()))
    if mode == "stop" and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    while True:
        generator.text_completion(["The cat"], max_gen_len=32, temperature=0.8)
        if mode == "stop":
            return


if __name__ == "__main__":
    run_script(main)
