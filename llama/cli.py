"""What the command-line scripts share: running a fire command, and the demo model they default to."""

import sys
from collections.abc import Callable
from pathlib import Path

import fire
import torch.distributed as dist

from llama.runtime import is_main_process

# The small model this repository ships in models/ (see MODEL_CARD.md): what the scripts run when
# no checkpoint is named, so the library can be tried without Meta's weights. It comes with a
# clone of the repository, not with an installed package.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "llama-2-demo"


def run_script(main: Callable[..., None]) -> None:
    """Run a fire CLI; a mistake in the user's input ends it with one clear line, not a traceback."""
    try:
        fire.Fire(main)
    except (ValueError, FileNotFoundError) as err:
        if is_main_process():
            print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
