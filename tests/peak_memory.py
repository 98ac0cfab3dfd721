"""Run a module as `python -m` would and print, as JSON, the peak memory it added, in bytes.

    python tests/peak_memory.py llama.reshard SRC DST --model-parallel-size 4

"private" is anonymous memory, what can run a machine out of memory; "resident" adds the pages
of memory-mapped files, which the kernel drops again when memory runs short. Linux only.
"""

import json
import runpy
import sys
import threading
import time
from pathlib import Path

import llama  # noqa: F401  (torch, fairscale and the library are loaded before the baseline)


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    module, *args = sys.argv[1:]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM, the resident peak, restarts from here
    start_private, start_resident = status("RssAnon"), status("VmRSS")
    peak_private, running = start_private, True

    def sample() -> None:
        nonlocal peak_private
        while running:
            peak_private = max(peak_private, status("RssAnon"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        running = False
        sampler.join()
    peak = {"private": peak_private - start_private, "resident": status("VmHWM") - start_resident}
    print(json.dumps(peak))


if __name__ == "__main__":
    main()
