"""Check a checkpoint folder's files against its checklist.chk, as Meta's download instructions do.

    python -m llama.verify llama-2-7b/

Damaged tensor data can load and then give NaN or nonsense; this finds it. Llama.build and the
scripts do the same first with verify=True / --verify.
"""

from llama.checkpoint import verify
from llama.cli import run_script


def main(ckpt_dir: str) -> None:
    """Check every file CKPT_DIR/checklist.chk lists against its md5 sum."""
    names = verify(ckpt_dir)
    print(f"{ckpt_dir}: all {len(names)} files match checklist.chk")


if __name__ == "__main__":
    run_script(main)
