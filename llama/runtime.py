"""Where the model runs: device, dtype and the process group, decided in one place.

The reference hard-codes CUDA, NCCL and a global default tensor type. Here a single
function looks at the machine once and every other module receives its answer. The group's
processes also keep a word with each other through the launcher's key-value store: each says
it is alive every few seconds, so that one whose collective times out can name the peer that
stopped answering, and a message that several processes would print is printed once.
"""

import atexit
import contextlib
import functools
import hashlib
import io
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from unittest import mock

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

# How long a collective waits for a peer before giving up, in seconds (gloo's own default is 30
# minutes): long enough for the slowest process to finish loading its share.
TIMEOUT_ENV = "LLAMA_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
HEARTBEAT_S = 2.0

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class Runtime:
    """The device and dtype the weights live in, and the collective backend that joins ranks."""

    device: torch.device
    dtype: torch.dtype
    backend: str


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str | torch.device) -> torch.device:
    """The device named, if this machine and this build of torch have it; else say what is available."""
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use one of {', '.join(available)}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this build of torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {str(device)!r} is not available: {why}; use one of {', '.join(available)}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported: use one of {', '.join(available)}")
    return device


def choose_runtime(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Runtime:
    """CUDA with NCCL when a GPU is present (bf16 where supported, else fp16); CPU with gloo in fp32.

    fp32 is the CPU default because bf16 matmuls are several times slower than fp32 on most CPUs.
    Under torchrun each process takes the GPU numbered by its LOCAL_RANK.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        default_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        backend = "nccl"
    else:
        default_dtype = torch.float32
        backend = "gloo"
    return Runtime(device, parse_dtype(dtype) if dtype is not None else default_dtype, backend)


def init_model_parallel(runtime: Runtime, model_parallel_size: int | None = None) -> int:
    """Join (or create) the process group and fairscale's model-parallel group; return its size.

    Without torchrun a one-process group is made from an in-memory store, so plain `python`
    works. If the caller already set up model parallelism, its size is used as it is.
    """
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(runtime.backend, timeout=collective_timeout())
            if dist.get_world_size() > 1:
                Heartbeat().start()
        else:
            dist.init_process_group(runtime.backend, store=dist.HashStore(), rank=0, world_size=1)
    if fs_init.model_parallel_is_initialized():
        existing = fs_init.get_model_parallel_world_size()
        if model_parallel_size is not None and model_parallel_size != existing:
            raise ValueError(
                f"model parallelism is already initialised with size {existing}, "
                f"but model_parallel_size={model_parallel_size} was requested"
            )
        return existing
    if model_parallel_size is None:
        model_parallel_size = dist.get_world_size()
    # fairscale makes its groups with torch's 30-minute default timeout; give them ours. It also
    # prints three "> initializing ... with size N" lines, which nobody needs.
    with_timeout = functools.partial(dist.new_group, timeout=collective_timeout())
    with mock.patch.object(dist, "new_group", with_timeout), contextlib.redirect_stdout(io.StringIO()):
        fs_init.initialize_model_parallel(model_parallel_size)
    return model_parallel_size


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    """Only this process prints, so a torchrun group shows each answer once."""
    return rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def collective_timeout() -> timedelta:
    """LLAMA_TIMEOUT seconds, or DEFAULT_TIMEOUT_S."""
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{TIMEOUT_ENV}={value!r}: give the seconds a process may wait for a peer, a positive number")
    return timedelta(seconds=seconds)


def group_store() -> dist.Store | None:
    """A connection to the launcher's key-value store, or None for one process (or if it is gone).

    The same store torchrun's processes meet at; this client is our own, so it also works
    before the process group exists and after it has failed.
    """
    if world_size() == 1 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=5)
        )
    except (RuntimeError, ValueError, OSError):
        return None


def store_key(name: str) -> str:
    """A key of this run (torchrun's run id and restart count), so that runs never share one."""
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '')}"
    return f"llama/{run}/{name}"


def say_once(line: str, topic: str | None = None) -> None:
    """Print a line on stderr once for the whole group: the first process to have it (or another
    line on the same topic) says it."""
    store = group_store()
    if store is not None:
        try:
            if store.add(store_key("said/" + hashlib.sha1((topic or line).encode()).hexdigest()), 1) > 1:
                return
        except RuntimeError:
            pass  # the store is gone with its host: say it anyway
    print(line, file=sys.stderr, flush=True)


class Heartbeat(threading.Thread):
    """Tells the group every HEARTBEAT_S seconds that this process is alive (see silent_peers).

    It is stopped and joined when the interpreter exits: a thread still inside a store call while
    the interpreter tears down aborts the process ("terminate called without an active exception").
    """

    def __init__(self):
        super().__init__(name="llama-heartbeat", daemon=True)
        self.key, self.stopping = store_key(f"alive/{rank()}"), threading.Event()

    def start(self) -> None:
        super().start()
        atexit.register(self.stop)

    def stop(self) -> None:
        self.stopping.set()
        self.join()

    def run(self) -> None:
        store = group_store()
        while store is not None and not self.stopping.is_set():
            try:
                store.add(self.key, 1)
            except RuntimeError:
                return
            self.stopping.wait(HEARTBEAT_S)


def close_process_group() -> None:
    """Leave the process group, this process's heartbeat first: a heartbeat inside a store call
    while the group's store is torn down aborts the process as at exit (see Heartbeat)."""
    for thread in threading.enumerate():
        if isinstance(thread, Heartbeat):
            thread.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


def silent_peers() -> list[int] | None:
    """The ranks whose heartbeat stood still for a few beats (stopped, not dead), or None if unknown."""
    store = group_store()
    if store is None:
        return None

    def beats() -> list[int]:
        return [store.add(store_key(f"alive/{r}"), 0) for r in range(world_size())]

    try:
        before = beats()
        time.sleep(2.5 * HEARTBEAT_S)
        after = beats()
    except RuntimeError:
        return None
    return [r for r, (b, a) in enumerate(zip(before, after)) if a == b and r != rank()]
