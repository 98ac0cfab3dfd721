"""How fast generation is, and how close to what the machine allows.

    python -m llama.bench --shape 110M                 # random weights shaped like a 110M Llama
    python -m llama.bench --ckpt_dir models/llama-2-demo
    python -m llama.bench --shape 110M --compare hf    # HF transformers on the same weights
    python -m llama.bench --shape 110M --compile       # the decode step through torch.compile
    python -m llama.bench --shape 110M --compile --quantize int8   # int8 weights (int4, int4:g32)
    python -m llama.bench --shape 110M --compile --quantize none,int8,int4 --compare hf   # side by side

Decode reads every weight once per step, so its ceiling is memory bandwidth / weight bytes;
prefill is bound by arithmetic. Both ceilings are measured here, on this machine, and the
results are printed as a table and, with --json_path FILE, appended as JSON lines.
"""

import json
import multiprocessing
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from llama.checkpoint import save_checkpoint
from llama.cli import run_script
from llama.generation import Llama
from llama.loading import RankWeights, load_model, open_checkpoint
from llama.memory import available_memory, check_memory
from llama.model import SHAPES, ModelArgs, Transformer, num_parameters, weight_layout
from llama.quantization import Scheme, check_groups, parse_scheme
from llama.runtime import Runtime, choose_runtime, init_model_parallel, is_main_process
from llama.tokenizer import Tokenizer
from llama.writing import new_folder

VOCAB_SIZE = 32000
MAX_SEQ_LEN, MAX_BATCH_SIZE = 512, 8  # the KV cache every measurement fits in


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights of a given shape; scaled so activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, split in weight_layout(args).items():
        if len(split.shape) == 1:
            weight = 1.0 + 0.1 * torch.randn(split.shape, generator=generator)
        else:
            weight = torch.randn(split.shape, generator=generator) / split.shape[1] ** 0.5
        state_dict[key] = weight.to(dtype)
    return state_dict


def shape_params(shape: str, vocab_size: int = VOCAB_SIZE) -> dict:
    return {**SHAPES[shape], "norm_eps": 1e-5, "vocab_size": vocab_size}


def write_random_checkpoint(folder: Path, shape: str, dtype: torch.dtype, tokenizer: Path | None) -> None:
    params = shape_params(shape, Tokenizer(str(tokenizer)).n_words if tokenizer else VOCAB_SIZE)
    args = ModelArgs(**params)
    with new_folder(folder, None, num_parameters(args) * dtype.itemsize) as partial:
        save_checkpoint(partial, [random_state_dict(args, seed=0, dtype=dtype)], params)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, partial / "tokenizer.model")


def random_checkpoint(shape: str, work_dir: Path, dtype: torch.dtype, tokenizer: Path | None = None) -> Path:
    """Create (once) a random checkpoint in a child process, so its memory does not count as ours.

    With a tokenizer, the vocabulary is the tokenizer's and the folder holds it (for the server).
    """
    name = f"random-{shape}-{str(dtype).removeprefix('torch.')}" + (f"-{tokenizer.parent.name}" if tokenizer else "")
    folder = work_dir / name
    if not (folder / "params.json").exists():
        child = multiprocessing.get_context("spawn").Process(
            target=write_random_checkpoint, args=(folder, shape, dtype, tokenizer)
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise ValueError(f"could not write the random {shape} checkpoint to {str(folder)!r} (see above)")
    return folder


class Steps:
    """Which measurement is running, and for how long the benchmark has run, on stderr (rank 0)."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, what: str) -> None:
        if is_main_process():
            print(f"bench: {what} ({time.perf_counter() - self.start:.0f} s)", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Let the resident peak restart from here (Linux), so that each of several loads has its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds that one run takes, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def best_time(run: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """The fastest of a few runs, after one warm-up: the least disturbed by other work."""
    run()
    return min(elapsed(run, device) for _ in range(repeats))


def memory_bandwidth(device: torch.device) -> float:
    """Bytes per second for reading a buffer far larger than any cache: the faster of two ways
    (torch's sum, and BLAS's dot product of the buffer with itself, which reads it once)."""
    buffer = torch.ones(128 * 2**20, device=device)  # 512 MiB
    fastest = min(best_time(read, device, repeats=5) for read in (buffer.sum, lambda: torch.dot(buffer, buffer)))
    return buffer.nbytes / fastest


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Floating-point operations per second of a large matrix product in the model's dtype."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b, device)


def weight_bytes_per_token(model: Transformer) -> int:
    """Weights read by one decode step (a quantized model's integers and scales): all of them but
    the embedding table, of which one row."""
    total = sum(t.nbytes for t in model.state_dict().values())
    return total - model.tok_embeddings.weight.nbytes


def flops_per_token(args: ModelArgs) -> float:
    return 2 * (num_parameters(args) - args.vocab_size * args.dim)


def random_prompts(batch: int, lengths: list[int], vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randint(3, vocab_size, (lengths[i % len(lengths)],), generator=generator).tolist() for i in range(batch)
    ]


def reference_generate(generator: Llama, prompt_tokens: list[list[int]], max_gen_len: int) -> None:
    """Meta's decoding loop, greedy: start at the shortest prompt and feed longer prompts' remaining
    tokens one forward pass at a time. Kept here only to measure what per-sequence prefill saves."""
    model = generator.model
    device = model.tok_embeddings.weight.device
    lengths = [len(t) for t in prompt_tokens]
    total_len = min(model.params.max_seq_len, max_gen_len + max(lengths))
    tokens = torch.zeros((len(prompt_tokens), total_len), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompt_tokens):
        tokens[i, : len(prompt)] = torch.tensor(prompt, device=device)
    is_prompt = torch.arange(total_len, device=device) < torch.tensor(lengths, device=device).unsqueeze(1)
    prev_pos = 0
    with torch.inference_mode():
        for cur_pos in range(min(lengths), total_len):
            logits = model.forward(tokens[:, prev_pos:cur_pos], prev_pos)
            next_token = torch.argmax(logits[:, -1], dim=-1)
            tokens[:, cur_pos] = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            prev_pos = cur_pos


def generation_time(generator: Llama, prompts: list[list[int]], new_tokens: int, device: torch.device) -> float:
    """The best time to generate exactly new_tokens per prompt."""
    return best_time(lambda: generate_exactly(generator, prompts, new_tokens), device)


def generate_exactly(generator: Llama, prompts: list[list[int]], new_tokens: int) -> None:
    """new_tokens per prompt, greedily (the benchmark's tokenizer has no EOS)."""
    tokens, _ = generator.generate(prompts, max_gen_len=new_tokens, temperature=0)
    if any(len(t) != new_tokens for t in tokens):
        raise RuntimeError("a benchmark run generated fewer tokens than it times")


DECODE_ROUNDS = 5


def paired_decode(
    generator: Llama, prompts: list[list[int]], new_tokens: int, first_token: float, device: torch.device
) -> dict[str, float | list[float]]:
    """Decode rates at batch 1, each timed between two reads of memory, and their medians.

    A shared machine's memory speed can move by half within seconds: a rate set against one read
    taken before it said anything from 58 to 106% of the bound for the same code. Each round's rate
    is set against the mean of the reads on either side of it.
    """
    generate_exactly(generator, prompts, new_tokens)  # warm: caches, and a compiled step compiles
    reads, rates = [memory_bandwidth(device)], []
    for _ in range(DECODE_ROUNDS):
        seconds = elapsed(lambda: generate_exactly(generator, prompts, new_tokens), device)
        rates.append((new_tokens - 1) / (seconds - first_token))
        reads.append(memory_bandwidth(device))
    around = [(before + after) / 2 for before, after in zip(reads, reads[1:])]
    return {
        "decode_tokens_per_s_batch_1": statistics.median(rates),
        "bandwidth_bytes_per_s": statistics.median(around),
        "decode_rounds_tokens_per_s": rates,
        "decode_rounds_bandwidth_bytes_per_s": around,
    }


def measure(generator: Llama, runtime: Runtime, prompt_len: int, new_tokens: int, step: Steps) -> dict[str, float]:
    """Time to first token, prefill and decode rates, and the mixed-length batch against Meta's loop.

    A shared machine's limits drift within minutes, so each is measured beside the rate it bounds:
    the arithmetic just before prefill, memory on either side of each decode (paired_decode).
    """
    device = runtime.device
    vocab_size = generator.model.params.vocab_size
    one = random_prompts(1, [prompt_len], vocab_size)
    eight = random_prompts(8, [prompt_len], vocab_size)
    step("matrix-multiply throughput")
    result = {"matmul_flops_per_s": matmul_flops(device, runtime.dtype)}
    step("prefill")
    first_token = generation_time(generator, one, 1, device)
    result |= {"time_to_first_token_s": first_token, "prefill_tokens_per_s": prompt_len / first_token}
    step("decode, batch 1, taking turns with reads of memory")
    result |= paired_decode(generator, one, new_tokens, first_token, device)
    step("decode, batch 8")
    first_token_8 = generation_time(generator, eight, 1, device)
    decode_8 = generation_time(generator, eight, new_tokens, device) - first_token_8
    result["decode_tokens_per_s_batch_8"] = 8 * (new_tokens - 1) / decode_8
    step("mixed batch of 8, ours and Meta's loop")
    mixed = random_prompts(8, [16, 256, 48, 200, 96, 128, 32, 160], vocab_size)
    result["mixed_batch_s"] = generation_time(generator, mixed, 64, device)
    result["mixed_batch_reference_loop_s"] = best_time(lambda: reference_generate(generator, mixed, 64), device)
    return result


def load(
    ckpt_dir: Path, tokenizer_path: str | None, runtime: Runtime, compile: bool, quantize: Scheme | None
) -> tuple[Llama, dict]:
    """Build the generator, recording load time and the peak memory added while loading."""
    init_model_parallel(runtime, 1)
    if tokenizer_path is not None:
        tokenizer = Tokenizer(tokenizer_path)
        tokenizer.eos_id = -1  # a benchmark times a fixed number of tokens: EOS must not end a run
    else:  # random weights: token ids only
        tokenizer = SimpleNamespace(n_words=VOCAB_SIZE, bos_id=1, eos_id=-1, pad_id=-1)
    reset_peak_rss()
    baseline = rss_bytes()
    start = time.perf_counter()
    model = load_model(ckpt_dir, tokenizer, runtime, MAX_SEQ_LEN, MAX_BATCH_SIZE, quantize=quantize)
    synchronize(runtime.device)
    loaded = {"load_s": time.perf_counter() - start, "load_peak_rss_bytes": peak_rss_bytes() - baseline}
    loaded["weight_bytes"] = sum(t.nbytes for t in model.state_dict().values())
    # The KV cache is allocated while loading too, but its zeroed pages are resident only once
    # written, so the peak is compared with both together: at most 1x is the target.
    loaded["kv_cache_bytes"] = sum(t.nbytes for layer in model.layers for t in layer.attention.cache.buffers())
    held = loaded["weight_bytes"] + loaded["kv_cache_bytes"]
    loaded["load_peak_rss_over_weights_and_cache"] = loaded["load_peak_rss_bytes"] / held
    return Llama(model, tokenizer, compile), loaded


def main(
    shape: str | None = None,
    ckpt_dir: str | None = None,
    tokenizer_path: str | None = None,
    compare: str | None = None,
    prompt_len: int = 128,
    new_tokens: int = 128,
    device: str | None = None,
    dtype: str | None = None,
    work_dir: str = "~/.cache/llama-bench",
    json_path: str | None = None,
    compile: bool = False,
    quantize: str | None = None,
) -> None:
    schemes = parse_schemes(quantize)
    if (shape is None) == (ckpt_dir is None):
        raise ValueError(f"give either --shape ({', '.join(SHAPES)}) or --ckpt_dir")
    if compare not in (None, "hf"):
        raise ValueError(f"unknown --compare {compare!r}: the one supported peer is 'hf'")
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 256:
            raise ValueError(f"--{name} must be a whole number from 2 to 256, got {value!r}")
    runtime = choose_runtime(device, dtype)
    step = Steps()
    if shape is not None:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
        # Before anything is written: would the model fit this machine?
        args = ModelArgs(**shape_params(shape), max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH_SIZE)
        for scheme in schemes:
            check_memory(args, 1, runtime, available_memory(runtime.device), scheme)
        step(f"writing the random {shape} checkpoint (once)")
        folder = random_checkpoint(shape, Path(work_dir).expanduser(), runtime.dtype)
    else:
        folder = Path(ckpt_dir)
        if tokenizer_path is None:
            tokenizer_path = str(folder / "tokenizer.model")
    layout = weight_layout(open_checkpoint(folder).args)
    for scheme in schemes:  # a group size the model cannot take is refused before anything is measured
        if scheme is not None:
            check_groups(layout, scheme, 1, [1])
    reports, hf = [], {}
    for scheme in schemes:
        step(f"loading, weights as {scheme.name if scheme else 'they are'}")
        generator, report = load(folder, tokenizer_path, runtime, compile, scheme)
        args = generator.model.params
        report |= {"model": shape or str(ckpt_dir), "device": str(runtime.device), "dtype": str(runtime.dtype)}
        report |= {"compile": compile, "quantize": scheme.name if scheme else None}
        report |= measure(generator, runtime, prompt_len, new_tokens, step)
        bandwidth, flops = report["bandwidth_bytes_per_s"], report["matmul_flops_per_s"]
        report["decode_bytes_per_token"] = weight_bytes_per_token(generator.model)
        report["decode_bound_tokens_per_s"] = bandwidth / report["decode_bytes_per_token"]
        report["decode_of_bound"] = statistics.median(
            rate / (read / report["decode_bytes_per_token"])
            for rate, read in zip(report["decode_rounds_tokens_per_s"], report["decode_rounds_bandwidth_bytes_per_s"])
        )
        report["prefill_bound_tokens_per_s"] = flops / flops_per_token(args)
        report["prefill_of_bound"] = report["prefill_tokens_per_s"] / report["prefill_bound_tokens_per_s"]
        report["mixed_batch_speedup"] = report["mixed_batch_reference_loop_s"] / report["mixed_batch_s"]
        if compare == "hf" and not hf:
            step("HF transformers on the same checkpoint, unquantized")
            hf_model = hugging_face_model(folder, generator, runtime)
            hf = measure_hf(hf_model, runtime.device, prompt_len, new_tokens, args.vocab_size)
            del hf_model
        if hf:
            report |= hf
            report["decode_vs_hf"] = report["decode_tokens_per_s_batch_1"] / hf["hf_decode_tokens_per_s_batch_1"]
            report["prefill_vs_hf"] = report["prefill_tokens_per_s"] / hf["hf_prefill_tokens_per_s"]
        reports.append(report)
        if is_main_process():
            print_table(report)
            print(flush=True)
        del generator  # before the next scheme's model is loaded
    if is_main_process():
        if len(reports) > 1:
            print_comparison(reports)
        if json_path is not None:
            with open(json_path, "a") as out:
                out.writelines(json.dumps(report) + "\n" for report in reports)


def parse_schemes(quantize) -> list[Scheme | None]:
    """--quantize int8, or several to measure one after the other: none,int8,int4 (fire may hand
    those over as a tuple)."""
    if quantize is None:
        return [None]
    names = list(quantize) if isinstance(quantize, list | tuple) else str(quantize).split(",")
    return [parse_scheme(name.strip()) for name in names]


def print_comparison(reports: list[dict]) -> None:
    """Each scheme's rates beside the first one's, from the same run."""
    first = reports[0]
    baseline = f"vs {first['quantize'] or 'unquantized'}"
    print(f"{'weights':<14}{'decode, batch 1':>22}{baseline:>18}{'prefill':>16}{'decode vs HF':>14}")
    for r in reports:
        decode = r["decode_tokens_per_s_batch_1"]
        rate = f"{decode:.1f} tok/s ({r['decode_of_bound']:.0%})"
        relative = f"{decode / first['decode_tokens_per_s_batch_1']:.2f}x"
        prefill = f"{r['prefill_tokens_per_s']:.0f} tok/s"
        vs_hf = f"{r['decode_vs_hf']:.2f}x" if "decode_vs_hf" in r else ""
        name = r["quantize"] or r["dtype"].removeprefix("torch.")
        print(f"{name:<14}{rate:>22}{relative:>18}{prefill:>16}{vs_hf:>14}")


def hugging_face_model(ckpt_dir: Path, generator: Llama, runtime: Runtime):
    """transformers' LlamaForCausalLM holding the checkpoint's weights, converted by llama.convert's rules."""
    import transformers

    from llama.hf import ROTARY_WEIGHTS, config_from_args, hf_name, interleaved_to_halves

    transformers.logging.set_verbosity_error()
    args = generator.model.params
    # The benchmark's tokenizer has no EOS (-1), which transformers would warn about on every call.
    config = {**config_from_args(args, runtime.dtype, generator.tokenizer), "eos_token_id": None}
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    hf_model = hf_model.to(device=runtime.device, dtype=runtime.dtype).eval()
    weights = {}
    for key, tensor in RankWeights(open_checkpoint(ckpt_dir), 0, 1).items():
        if key.endswith(ROTARY_WEIGHTS):
            tensor = interleaved_to_halves(tensor, args.head_dim)
        weights[hf_name(key)] = tensor
    hf_model.load_state_dict(weights, strict=True)
    return hf_model


def measure_hf(hf_model, device: torch.device, prompt_len: int, new_tokens: int, vocab_size: int) -> dict[str, float]:
    """The same measurements for Hugging Face transformers' LlamaForCausalLM, greedy, KV-cached."""
    prompt = torch.tensor(random_prompts(1, [prompt_len], vocab_size), device=device)

    def run(n: int) -> Callable[[], object]:
        kwargs = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0}
        return lambda: hf_model.generate(prompt, **kwargs)

    with torch.inference_mode():
        first_token = best_time(run(1), device)
        full = best_time(run(new_tokens), device)
    return {
        "hf_prefill_tokens_per_s": prompt_len / first_token,
        "hf_decode_tokens_per_s_batch_1": (new_tokens - 1) / (full - first_token),
    }


def of_bound(fraction: float) -> str:
    """A rate as a share of the machine's bound; above it, the measurement itself went wrong."""
    if fraction > 1:
        return f"{fraction:.0%} of bound: above what the machine allows, so a measurement problem (rerun it)"
    return f"{fraction:.0%} of bound"


def print_table(r: dict) -> None:
    held = r["weight_bytes"] + r["kv_cache_bytes"]
    rows = [
        ("model", r["model"], ""),
        ("device / dtype", f"{r['device']} / {r['dtype'].removeprefix('torch.')}", ""),
        ("decode step", "compiled" if r["compile"] else "eager", ""),
        ("weights stored as", r["quantize"] or r["dtype"].removeprefix("torch."), ""),
        ("weights", f"{r['weight_bytes'] / 1e6:.0f} MB", ""),
        ("load", f"{r['load_s']:.2f} s", f"peak RSS +{r['load_peak_rss_bytes'] / 1e6:.0f} MB"),
        ("", "", f"{r['load_peak_rss_over_weights_and_cache']:.2f}x weights + KV cache ({held / 1e6:.0f} MB)"),
        ("time to first token", f"{r['time_to_first_token_s'] * 1e3:.1f} ms", ""),
        ("prefill", f"{r['prefill_tokens_per_s']:.0f} tok/s", of_bound(r["prefill_of_bound"])),
        ("decode, batch 1", f"{r['decode_tokens_per_s_batch_1']:.1f} tok/s", of_bound(r["decode_of_bound"])),
        ("decode, batch 8", f"{r['decode_tokens_per_s_batch_8']:.1f} tok/s", ""),
        ("mixed batch of 8", f"{r['mixed_batch_s']:.2f} s", f"{r['mixed_batch_speedup']:.1f}x Meta's loop"),
        (
            "memory bandwidth",
            f"{r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s",
            f"bound {r['decode_bound_tokens_per_s']:.1f} tok/s",
        ),
        (
            "matmul",
            f"{r['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s",
            f"bound {r['prefill_bound_tokens_per_s']:.0f} tok/s",
        ),
    ]
    if "hf_decode_tokens_per_s_batch_1" in r:
        rows += [
            ("HF prefill", f"{r['hf_prefill_tokens_per_s']:.0f} tok/s", f"ours {r['prefill_vs_hf']:.2f}x"),
            (
                "HF decode, batch 1",
                f"{r['hf_decode_tokens_per_s_batch_1']:.1f} tok/s",
                f"ours {r['decode_vs_hf']:.2f}x",
            ),
        ]
    for name, value, note in rows:
        print(f"{name:<22}{value:>16}   {note}")


if __name__ == "__main__":
    run_script(main)
