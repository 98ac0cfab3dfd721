"""Weight-only int8/int4: the arithmetic, the layers, quantized checkpoints, and what it costs in quality."""

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama import Llama, kernels
from llama.checkpoint import md5sum
from llama.convert import to_hugging_face
from llama.loading import load_model
from llama.memory import estimate_memory
from llama.model import weight_layout
from llama.quantization import (
    QuantizedColumnParallel,
    QuantizedRowParallel,
    Scheme,
    dequantize,
    parse_scheme,
    quantize,
    quantized_bytes,
    row_amax,
)
from llama.quantize import quantize_checkpoint
from llama.reshard import reshard
from llama.runtime import choose_runtime
from tests.distributed_worker import build as build_for_workers
from tests.distributed_worker import run
from tests.helpers import (
    DEMO,
    GROUPED_QUERY,
    ROOT,
    TOKENS,
    build,
    copy_of,
    environment,
    free_port,
    mapping_of,
    model_args,
    torchrun,
    write_checkpoint,
)
from tools.demo_data import held_out_dialogs, plain_text
from tools.evaluate_demo_model import answer_all

WORKER = str(Path(__file__).with_name("distributed_worker.py"))
# The test model's feed-forward width (224, 112 per rank on two processes) takes groups of 16.
SCHEMES = ["int8", "int4:g16"]


@pytest.mark.parametrize("scheme", [Scheme(8), Scheme(4, 64), Scheme(4, 32), Scheme(4, 128)])
def test_every_value_is_within_half_a_step_of_its_weight(scheme: Scheme) -> None:
    weight = torch.randn(96, 256) * torch.linspace(0.01, 3, 256)  # groups of very different sizes
    q, scales = quantize(weight, scheme)
    assert q.dtype == (torch.int8 if scheme.bits == 8 else torch.uint8)
    assert q.shape == (96, 256 if scheme.bits == 8 else 128) and scales.shape == scheme.scale_shape(96, 256)
    groups = weight.view(96, -1, 256 if scheme.bits == 8 else scheme.group_size)
    error = (dequantize(q, scales, scheme) - weight).abs().view(groups.shape)
    scales = scales.view(96, -1)
    assert (error <= scales.unsqueeze(-1) / 2 + 1e-6).all()
    # The largest value of each row (int8) or group (int4) is represented exactly: the scale is fitted to it.
    if scheme.bits == 8:
        assert torch.allclose(scales * 127, groups.abs().amax(-1))
    else:  # the largest positive value as 7, or the largest negative one as -8
        assert torch.allclose(scales, torch.maximum(groups.amax(-1) / 7, groups.amin(-1) / -8))


def test_int8_scales_of_a_ranks_columns_are_those_of_the_whole_rows() -> None:
    weight = torch.randn(40, 128) * torch.linspace(0.01, 3, 128)
    q, scales = quantize(weight, Scheme(8))
    part_q, part_scales = quantize(weight[:, :64], Scheme(8), row_amax(weight))
    assert torch.equal(part_q, q[:, :64]) and torch.equal(part_scales, scales)


def test_int4_uses_all_sixteen_levels_and_packs_two_to_a_byte() -> None:
    weight = torch.arange(-8, 8, dtype=torch.float32).repeat(4, 4)  # each group of 64 spans -8..7
    q, scales = quantize(weight, Scheme(4))
    assert q.shape == (4, 32) and torch.equal(scales, torch.ones(4, 1))
    assert torch.equal(dequantize(q, scales, Scheme(4)), weight)
    # Byte j of a group holds elements j and j + 32: here -8 and 7, stored as 0 and 15.
    q, _ = quantize(torch.cat((torch.full((1, 32), -8.0), torch.full((1, 32), 7.0)), dim=1), Scheme(4))
    assert torch.equal(q, torch.full((1, 32), 0xF0, dtype=torch.uint8))


@pytest.mark.parametrize("scheme", [Scheme(8), Scheme(4, 64)])
def test_quantizing_in_blocks_of_rows_changes_nothing(scheme: Scheme, monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.randn(300, 128)
    whole = quantize(weight, scheme)
    monkeypatch.setattr("llama.quantization.CHUNK", 1000)  # 7 rows at a time
    blocks = quantize(weight, scheme)
    assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1])


@pytest.mark.parametrize("text", ["int2", "int4:g0", "int4:g33", "int4:64", "fp8", "INT8"])
def test_unknown_schemes_are_refused_naming_the_ones_that_exist(text: str) -> None:
    with pytest.raises(ValueError, match=r"unknown quantization .*use int8, or int4"):
        parse_scheme(text)


def test_int8_with_groups_is_refused_saying_it_has_none() -> None:
    with pytest.raises(ValueError, match=r"'int8:g64': int8 keeps one scale per output feature, without groups"):
        parse_scheme("int8:g64")


@pytest.mark.parametrize("kernels_built", [True, False])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_layers_compute_the_product_with_the_dequantized_weight(
    scheme: str, kernels_built: bool, checkpoint: Path, tokenizer_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not kernels_built:
        monkeypatch.setattr(kernels, "available", lambda: False)
    model = build(checkpoint, tokenizer_path, quantize=scheme).model
    layers = [m for m in model.modules() if isinstance(m, QuantizedColumnParallel | QuantizedRowParallel)]
    assert len(layers) == 7 * GROUPED_QUERY["n_layers"] + 1  # every linear layer, the output layer too
    assert all(layer.kernel == (kernels_built and kernels.available()) for layer in layers)
    assert not any(name.endswith(".weight") and "norm" not in name and "embeddings" not in name
                   for name, _ in model.named_parameters())  # fmt: skip
    for layer in (model.output, model.layers[1].attention.wq, model.layers[0].feed_forward.w2):
        weight = layer.dequantized(0, None, torch.float32)
        # prefill (dequantized a tile of rows at a time, by the kernels where built), and decode
        for x in (torch.randn(3, 5, layer.in_features), torch.randn(2, 1, layer.in_features)):
            torch.testing.assert_close(layer(x), F.linear(x, weight))


def test_quantized_models_stay_close_to_the_original_int4_sixteen_times_less(checkpoint, tokenizer_path) -> None:
    """int8's step is 1/127 of a row's largest value, int4's about 1/7.5 of a group's: several times larger."""
    original = build(checkpoint, tokenizer_path).model(TOKENS, 0)
    error = {}
    for scheme in SCHEMES:
        quantized = build(checkpoint, tokenizer_path, quantize=scheme).model(TOKENS, 0)
        error[scheme] = ((quantized - original).norm() / original.norm()).item()
    assert 0 < error["int8"] < 0.05
    assert 4 < error["int4:g16"] / error["int8"] < 32


@pytest.mark.parametrize(("scheme", "kernels_built"), [("int8", True), ("int4:g16", True), ("int8", False)])
def test_compiled_decode_step_gives_the_eager_tokens(
    scheme: str, kernels_built: bool, checkpoint: Path, tokenizer_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the kernels, the compiled step calls them; without (a CPU they do not build on),
    Inductor fuses the dequantization into its row-by-row products."""
    if not kernels_built:
        monkeypatch.setattr(kernels, "available", lambda: False)
    prompts = ["The cat", "A dog sat on the mat and the sun", "Red"]
    eager = Llama.build(str(checkpoint), tokenizer_path, 48, 4, device="cpu", quantize=scheme)
    compiled = Llama(eager.model, eager.tokenizer, compile=True)
    expected = eager.text_completion(prompts, max_gen_len=12, temperature=0, logprobs=True)
    for batch in (prompts, prompts[:1]):
        got = compiled.text_completion(batch, max_gen_len=12, temperature=0, logprobs=True)
        for result, reference in zip(got, expected):
            assert result["generation"] == reference["generation"]
            torch.testing.assert_close(result["logprobs"], reference["logprobs"], atol=1e-4, rtol=1e-4)


def test_a_compiled_bf16_step_gives_the_eager_tokens(checkpoint: Path, tokenizer_path: str) -> None:
    """bf16 activations reach the kernels' fp32 products, in the compiled step as in the eager one."""
    prompts = ["The cat", "A dog sat on the mat and the sun", "Red"]
    eager = Llama.build(str(checkpoint), tokenizer_path, 48, 4, device="cpu", dtype="bfloat16", quantize="int8")
    compiled = Llama(eager.model, eager.tokenizer, compile=True)
    expected = eager.text_completion(prompts, max_gen_len=8, temperature=0, logprobs=True)
    for result, reference in zip(
        compiled.text_completion(prompts, max_gen_len=8, temperature=0, logprobs=True), expected
    ):
        assert result["generation"] == reference["generation"]
        torch.testing.assert_close(result["logprobs"], reference["logprobs"], atol=0.1, rtol=0.1)


@pytest.fixture(scope="module")
def saved(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test checkpoint quantized by `python -m llama.quantize`, in two shards."""
    out = tmp_path_factory.mktemp("quantized")
    for scheme in SCHEMES:
        quantize_checkpoint(checkpoint, out / scheme, scheme, 2)
    return {scheme: out / scheme for scheme in SCHEMES}


def test_a_quantized_checkpoint_records_its_scheme_and_holds_integers(saved: dict[str, Path]) -> None:
    folder = saved["int4:g16"]
    assert json.loads((folder / "params.json").read_text())["quantization"] == {"bits": 4, "group_size": 16}
    assert sorted(p.name for p in folder.iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json"
    ]  # fmt: skip
    shard = torch.load(folder / "consolidated.00.pth", weights_only=True)
    assert shard["layers.0.feed_forward.w2.qweight"].dtype == torch.uint8
    assert shard["layers.0.feed_forward.w2.qweight"].shape == (64, 56)  # 112 of 224 inputs, two to a byte
    assert shard["layers.0.feed_forward.w2.scales"].dtype == torch.float32
    assert shard["layers.0.feed_forward.w2.scales"].shape == (64, 7)  # groups of 16 of those 112
    assert shard["tok_embeddings.weight"].dtype == torch.float32
    assert "layers.0.feed_forward.w2.weight" not in shard


def test_an_int8_checkpoint_holds_whole_row_scales_in_every_shard(saved: dict[str, Path]) -> None:
    shards = [torch.load(saved["int8"] / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    assert shards[0]["layers.0.feed_forward.w2.qweight"].shape == (64, 112)
    assert shards[0]["layers.0.feed_forward.w2.scales"].shape == (64,)  # one per output row, of all 224 inputs
    assert torch.equal(shards[0]["layers.0.feed_forward.w2.scales"], shards[1]["layers.0.feed_forward.w2.scales"])
    assert shards[0]["layers.0.feed_forward.w1.scales"].shape == (112,)  # this shard's rows


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_saved_quantized_checkpoint_gives_exactly_the_logits_of_quantizing_on_load(
    scheme: str, saved: dict[str, Path], checkpoint: Path, tokenizer_path: str
) -> None:
    on_load = build(checkpoint, tokenizer_path, quantize=scheme).model(TOKENS, 0)
    assert torch.equal(build(saved[scheme], tokenizer_path).model(TOKENS, 0), on_load)
    assert torch.equal(build(saved[scheme], tokenizer_path, quantize=scheme).model(TOKENS, 0), on_load)


def test_loading_a_quantized_checkpoint_copies_nothing(saved: dict[str, Path], tokenizer, tmp_path: Path) -> None:
    """Its integers and fp32 scales become the model's storage where they lie in the mapped file."""
    reshard(saved["int8"], tmp_path / "mp1", 1)
    shard = tmp_path / "mp1" / "consolidated.00.pth"
    digest = md5sum(shard)
    model = load_model(tmp_path / "mp1", tokenizer, choose_runtime("cpu"), 32, 1)
    for layer in (model.layers[0].attention.wq, model.output):
        for tensor in (layer.qweight, layer.scales):
            assert mapping_of(tensor).path == str(shard)
    assert md5sum(shard) == digest  # the file itself as it was


@pytest.mark.parametrize("scheme", SCHEMES)
def test_two_processes_give_the_tokens_and_logits_of_one(
    scheme: str, checkpoint: Path, saved: dict[str, Path], tokenizer_path: str, tmp_path: Path
) -> None:
    expected = run(build_for_workers(str(checkpoint), tokenizer_path, scheme))
    for folder, flags in ((checkpoint, ["--quantize", scheme]), (saved[scheme], [])):
        command = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()), WORKER, *flags)
        done = subprocess.run(
            command + [str(tmp_path), tokenizer_path, str(folder)], env=environment(), capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        for rank in range(2):
            result = torch.load(tmp_path / f"{folder.name}-rank{rank}.pt", weights_only=True)
            torch.testing.assert_close(result["logits"], expected["logits"], atol=1e-5, rtol=1e-5)
            assert result["greedy"] == expected["greedy"] and result["sampled"] == expected["sampled"]


def test_a_quantized_checkpoint_reshards_and_loads_the_same(
    saved: dict[str, Path], tokenizer_path: str, tmp_path: Path
) -> None:
    reshard(saved["int8"], tmp_path / "mp1", 1)
    assert torch.equal(build(tmp_path / "mp1", tokenizer_path).model(TOKENS, 0),
                       build(saved["int8"], tokenizer_path).model(TOKENS, 0))  # fmt: skip


def test_a_split_that_cuts_groups_is_refused_naming_what_works(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"w2.weight has 224 input features, 112 on each of 2 processes, which is "
                       r"not a whole number of groups of 32: use a group size that divides 16, such as int4:g16, or "
                       r"1 process$"):  # fmt: skip
        quantize_checkpoint(checkpoint, tmp_path / "q", "int4:g32", 2)
    assert not (tmp_path / "q").exists()


def test_a_group_size_that_divides_no_width_is_refused(checkpoint: Path, tokenizer_path: str) -> None:
    with pytest.raises(ValueError, match=r"wq.weight has 64 input features which is not a whole number of groups of "
                       r"48: use a group size that divides 32, such as int4:g32$"):  # fmt: skip
        build(checkpoint, tokenizer_path, quantize="int4:g48")


def test_a_quantized_checkpoint_refuses_another_scheme_requantizing_and_export(
    saved: dict[str, Path], tokenizer_path: str, tmp_path: Path
) -> None:
    folder = saved["int8"]
    with pytest.raises(ValueError, match=r"is quantized as int8 already: leave --quantize out to load it"):
        build(folder, tokenizer_path, quantize="int4:g16")
    with pytest.raises(ValueError, match=r"is quantized as int8 already, and quantizing again would lose more"):
        quantize_checkpoint(folder, tmp_path / "again", "int4:g16")
    with pytest.raises(ValueError, match=r"quantized as int8, which Hugging Face's Llama format cannot hold"):
        to_hugging_face(folder, tmp_path / "hf", tokenizer_path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t: t[:, :-1], r"scales has shape \(64, 6\) but params.json implies \(64, 7\)"),
        (lambda t: t.half(), r"scales is float16, not float32: the file is damaged"),
    ],
)
def test_a_damaged_scale_tensor_is_named(damage, message: str, saved: dict[str, Path], tokenizer_path, tmp_path):
    folder = copy_of(saved["int4:g16"], tmp_path)
    shard = torch.load(folder / "consolidated.00.pth", weights_only=True)
    key = "layers.1.feed_forward.w2.scales"
    shard[key] = damage(shard[key]).contiguous()
    torch.save(shard, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match=f"consolidated.00.pth: weight {key[:-7]}.{message}"):
        build(folder, tokenizer_path)


def test_an_integer_tensor_of_the_wrong_kind_is_named(saved: dict[str, Path], tokenizer_path: str, tmp_path) -> None:
    folder = copy_of(saved["int8"], tmp_path)
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    shard["output.qweight"] = shard["output.qweight"].to(torch.uint8)
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated.01.pth: weight output.qweight is uint8, not int8"):
        build(folder, tokenizer_path)


def test_the_memory_estimate_counts_the_quantized_sizes(tokenizer) -> None:
    args = model_args(GROUPED_QUERY, tokenizer.n_words)
    layout = weight_layout(args)
    linear = sum(s.shape[0] * s.shape[1] for k, s in layout.items() if s.dim is not None and "embed" not in k)
    rest = sum(torch.Size(s.shape).numel() for s in layout.values()) - linear
    rows = sum(s.shape[0] for k, s in layout.items() if s.dim is not None and "embed" not in k)
    for text, integer_bytes, scales in (("int8", 1, rows), ("int4:g16", 0.5, linear // 16)):
        scheme = parse_scheme(text)
        expected = linear * integer_bytes + scales * 4 + rest * 4
        assert estimate_memory(args, 1, torch.float32, scheme).weights == expected
        assert quantized_bytes(layout, scheme, 2, 4) == estimate_memory(args, 2, torch.float32, scheme).weights


def test_quantizing_while_loading_never_holds_the_full_precision_model(
    tmp_path: Path, tokenizer, tokenizer_path: str, checkpoint: Path
) -> None:
    """The memory a quantize-on-load from a bf16 checkpoint adds: the int8 weights and KV cache and
    a little more, where loading in fp32 adds four times the int8 weights."""
    params = {**GROUPED_QUERY, "dim": 1024, "n_heads": 8, "n_layers": 3, "multiple_of": 64}
    folder = write_checkpoint(tmp_path / "big", params, tokenizer.n_words, dtype=torch.bfloat16)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat")

    def peak(folder: Path, *flags: str) -> int:
        """What scoring the text adds to memory at its peak: loading, then one forward pass."""
        command = [sys.executable, "tests/peak_memory.py", "llama.perplexity", "--ckpt_dir", str(folder),
                   "--text", str(text), "--tokenizer_path", tokenizer_path, "--max_seq_len", "16", *flags]  # fmt: skip
        done = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1])["private"]

    base = peak(checkpoint, "--quantize", "int8")  # the process's own needs, with a model of 160 KiB
    args = replace(model_args(params, tokenizer.n_words), max_seq_len=16, max_batch_size=4)
    fp32, int8 = estimate_memory(args, 1, torch.float32), estimate_memory(args, 1, torch.float32, parse_scheme("int8"))
    assert peak(folder) - base > 0.9 * fp32.weights  # 167 MB of fp32 weights made from the bf16 file
    # Beyond the 43 MB of int8 weights, a constant: quantizing CHUNK values (4 MB in fp32) at a
    # time, then in the forward pass dequantizing a tile of rows at a time, with their temporaries,
    # and what the allocator keeps of those blocks.
    assert peak(folder, "--quantize", "int8") - base < int8.total + 48 * 2**20


def test_perplexity_command_scores_every_token_once(checkpoint: Path, tokenizer_path: str, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog runs to the river " * 2)
    out = {}
    for max_seq_len in (8, 48):  # several windows, and one
        done = subprocess.run(
            [sys.executable, "-m", "llama.perplexity", "--ckpt_dir", str(checkpoint), "--tokenizer_path",
             tokenizer_path, "--text", str(text), "--max_seq_len", str(max_seq_len), "--max_batch_size", "3"],
            cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        out[max_seq_len] = dict(line.rsplit(None, 1) for line in done.stdout.splitlines()[-3:])
    generator = Llama.build(str(checkpoint), tokenizer_path, max_seq_len=48, max_batch_size=1, device="cpu")
    tokens = generator.tokenizer.encode(text.read_text(), bos=True, eos=False)
    assert len(tokens) <= 48
    logprobs = torch.log_softmax(generator.model(torch.tensor([tokens]), 0)[0, :-1], -1)
    nll = -logprobs.gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).mean().item()
    assert int(out[48]["tokens scored"]) == int(out[8]["tokens scored"]) == len(tokens) - 1
    assert float(out[48]["perplexity"]) == pytest.approx(torch.exp(torch.tensor(nll)).item(), rel=1e-4)
    assert float(out[8]["perplexity"]) > float(out[48]["perplexity"])  # less context per token


def test_perplexity_command_names_a_missing_or_empty_text(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    for name, message in (("missing.txt", "no text file"), ("empty.txt", "holds no text to score")):
        done = subprocess.run(
            [sys.executable, "-m", "llama.perplexity", "--text", str(tmp_path / name)],
            cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 1 and message in done.stderr, done.stderr


@pytest.fixture(scope="module")
def held_out_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stories of the kind the demo model learned all of (it never learns to predict the prompts of
    its dialogs), drawn from a seed training does not use."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text("\n".join(plain_text(rng) for _ in range(60)))
    return path


def demo_perplexity(text: Path, *flags: str) -> float:
    done = subprocess.run(
        [sys.executable, "-m", "llama.perplexity", "--text", str(text), "--max_seq_len", "256", *flags],
        cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.split()[-1])


def test_demo_perplexity_changes_little_when_quantized(held_out_text: Path) -> None:
    fp32 = demo_perplexity(held_out_text)
    assert fp32 < 20  # about 12: far below the 1000 words of its vocabulary
    assert demo_perplexity(held_out_text, "--quantize", "int8") == pytest.approx(fp32, rel=0.01)
    assert demo_perplexity(held_out_text, "--quantize", "int4") == pytest.approx(fp32, rel=0.05)


def test_demo_held_out_accuracy_changes_little_when_quantized() -> None:
    cases = held_out_dialogs(100, held_out_phrasing=True)
    accuracy = {}
    for scheme in (None, "int8", "int4"):
        generator = Llama.build(str(DEMO), None, 512, 25, device="cpu", quantize=scheme)
        answers = answer_all(generator, [dialog for dialog, _ in cases])
        accuracy[scheme] = sum(a == e for a, (_, e) in zip(answers, cases))
    assert accuracy[None] >= 80
    assert accuracy["int8"] >= accuracy[None] - 1
    assert accuracy["int4"] >= accuracy[None] - 5
