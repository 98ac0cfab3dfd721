"""Where the model runs: device, dtype and the process group, decided in one place.

The reference hard-codes CUDA, NCCL and a global default tensor type. Here a single
function looks at the machine once and every other module receives its answer.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

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


def choose_runtime(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Runtime:
    """CUDA with NCCL when a GPU is present (bf16 where supported, else fp16); CPU with gloo in fp32.

    fp32 is the CPU default because bf16 matmuls are several times slower than fp32 on most CPUs.
    Under torchrun each process takes the GPU numbered by its LOCAL_RANK.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
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
            dist.init_process_group(runtime.backend)
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
    fs_init.initialize_model_parallel(model_parallel_size)
    return model_parallel_size


def is_main_process() -> bool:
    """Only this process prints, so a torchrun group shows each answer once."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", 0)) == 0
