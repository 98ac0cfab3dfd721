"""Train the small demo model shipped in models/, from nothing, on this machine's CPU.

    python -m tools.train_demo_model            # about 46 minutes on 2 cores with bf16 instructions

Writes models/llama-2-demo/ (Meta's layout: consolidated.00.pth in bf16, params.json,
tokenizer.model, checklist.chk) and models/llama-2-demo-mp2/, the same weights in two shards.
The same seed gives the same tokenizer, data and initial weights.
"""

import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import fire
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from llama.chat_format import Dialog, encode_dialog
from llama.checkpoint import md5sum, save_checkpoint
from llama.compile import CPU_BF16
from llama.generation import Llama
from llama.model import ModelArgs, Transformer, num_parameters
from llama.reshard import reshard
from llama.runtime import choose_runtime, init_model_parallel
from llama.tokenizer import Tokenizer, train_tokenizer
from tools.demo_data import dialog, held_out_dialogs, plain_text
from tools.evaluate_demo_model import answer_all

# Grouped-query attention (8 query heads share 2 KV heads) and a non-default FFN width, as in 70B.
PARAMS = {
    "dim": 256,
    "n_layers": 4,
    "n_heads": 8,
    "n_kv_heads": 2,
    "multiple_of": 64,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": -1,
}
VOCAB_SIZE = 1000
CHAT_FRACTION = 0.8
PROMPT_CUT_FRACTION = 0.3
STEPS = 4200
PEAK_LR = 3e-3


def tokenizer_corpus(rng: random.Random, n: int) -> list[str]:
    """Text in the form the model will see it: chat transcripts in the Llama 2 format and stories."""
    lines = []
    for _ in range(n):
        if rng.random() < CHAT_FRACTION:
            messages, reply = dialog(rng)
            lines.append(" ".join(m["content"] for m in messages) + f" [INST] [/INST] <<SYS>> <</SYS>> {reply}")
        else:
            lines.append(plain_text(rng))
    return lines


def training_example(tokenizer: Tokenizer, rng: random.Random) -> tuple[list[int], list[bool]]:
    """Token ids and which of them are learned: every assistant answer in a dialog, all of a story.

    The prompt is encoded by the library's own chat-format code, so training and inference
    see exactly the same ids. Earlier answers in a dialog are correct worked examples too, so
    they are learned as well; the last answer follows with its leading space and ends with EOS.
    """
    if rng.random() < CHAT_FRACTION:
        messages, reply = dialog(rng)
        prompt = encode_dialog(tokenizer, messages)
        target = tokenizer.encode(reply, bos=False, eos=True)
        return prompt + target, earlier_answers(tokenizer, messages, prompt) + [True] * len(target)
    text = plain_text(rng)
    if rng.random() < PROMPT_CUT_FRACTION and " " in text:
        # Cut after a space, as a prompt ending in one is encoded (Meta's example prompts do):
        # a lone "▁" token, then the rest as its own text. Else the model only ever sees that
        # token before a digit, and continues such prompts with arithmetic.
        cut = rng.choice([i for i, char in enumerate(text) if char == " "]) + 1
        tokens = tokenizer.encode(text[:cut], bos=True, eos=False) + tokenizer.encode(text[cut:], bos=False, eos=True)
    else:
        tokens = tokenizer.encode(text, bos=True, eos=True)
    return tokens, [False] + [True] * (len(tokens) - 1)


def earlier_answers(tokenizer: Tokenizer, messages: Dialog, prompt: list[int]) -> list[bool]:
    """Marks the tokens of each finished assistant answer within a dialog's prompt.

    Each finished exchange is encoded as in encode_dialog, with the answer marked where its
    tokens are the same as the answer's own encoding (they are unless a merge crosses the
    space before it, in which case that answer is simply not learned).
    """
    learned = [False] * len(prompt)
    first_user = 1 if messages[0]["role"] == "system" else 0
    for user in range(first_user, len(messages) - 1, 2):
        start = len(encode_dialog(tokenizer, messages[: user + 1]))
        answer = tokenizer.encode(messages[user + 1]["content"], bos=False, eos=False)
        if prompt[start : start + len(answer)] == answer:
            learned[start : start + len(answer)] = [True] * len(answer)
    return learned


def batches(tokenizer: Tokenizer, rng: random.Random, size: int, max_len: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (inputs, targets) batches, right-padded; -100 marks targets that carry no loss.

    Examples are drawn in pools and grouped by length so that little compute goes to padding.
    """
    while True:
        pool = sorted((training_example(tokenizer, rng) for _ in range(size * 16)), key=lambda e: len(e[0]))
        groups = [pool[i : i + size] for i in range(0, len(pool), size)]
        rng.shuffle(groups)
        for examples in groups:
            length = min(max(len(tokens) for tokens, _ in examples), max_len + 1)
            inputs = torch.zeros((size, length - 1), dtype=torch.long)
            targets = torch.full((size, length - 1), -100, dtype=torch.long)
            for i, (tokens, learned) in enumerate(examples):
                tokens, learned = tokens[:length], learned[:length]
                inputs[i, : len(tokens) - 1] = torch.tensor(tokens[:-1])
                learned_targets = [t if keep else -100 for t, keep in zip(tokens[1:], learned[1:])]
                targets[i, : len(tokens) - 1] = torch.tensor(learned_targets)
            yield inputs, targets


class FloatAttention(TorchFunctionMode):
    """Attention in fp32 inside a bf16 autocast region: on a CPU, torch's bf16 flash-attention
    backward is slower than the fp32 one, while bf16 matrix products are several times faster."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            with torch.autocast("cpu", enabled=False):
                return func(*(t.float() for t in args[:3]), *args[3:], **kwargs)
        return func(*args, **kwargs)


def initialise(model: Transformer, n_layers: int) -> None:
    """GPT-2 style: small normal weights, output projections of residual branches scaled by depth."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(param)
        else:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            torch.nn.init.normal_(param, std=std)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def held_out_accuracy(model: Transformer, tokenizer: Tokenizer, held_out_phrasing: bool, n: int = 96) -> float:
    """Greedy answers to questions training never sees, to watch progress (the full check is the
    evaluation script); only watched: nothing here chooses the model.

    Asked of a copy that shares the trained weights and has a KV cache, which training does without.
    """
    with torch.device("meta"):
        inference = Transformer(replace(model.params, max_seq_len=512, max_batch_size=24))
    inference.load_state_dict(model.state_dict(), assign=True)
    inference.setup_caches()
    generator = Llama(inference, tokenizer)
    cases = held_out_dialogs(n, held_out_phrasing=held_out_phrasing)
    answers = answer_all(generator, [d for d, _ in cases])
    return sum(a == expected for a, (_, expected) in zip(answers, cases)) / n


def main(
    out_dir: str = "models/llama-2-demo",
    steps: int = STEPS,
    batch_size: int = 48,
    max_len: int = 256,
    peak_lr: float = PEAK_LR,
    seed: int = 0,
) -> None:
    """Train the tokenizer, then the model from scratch; write both in Meta's layout."""
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    # Subnormal floats (tiny gradients and second moments late in training) become zero: they
    # matter nothing to this model, and x86 CPUs compute them slowly. Part of the recipe.
    torch.set_flush_denormal(True)
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = train_tokenizer(tokenizer_corpus(rng, 20000), str(out / "tokenizer"), VOCAB_SIZE)
    (out / "tokenizer.vocab").unlink()
    tokenizer = Tokenizer(str(tokenizer_path))

    init_model_parallel(choose_runtime("cpu"), 1)
    args = ModelArgs(**{**PARAMS, "vocab_size": tokenizer.n_words}, max_seq_len=max_len, max_batch_size=batch_size)
    model = Transformer(args)
    initialise(model, args.n_layers)
    print(f"{num_parameters(args) / 1e6:.2f}M parameters, vocabulary {tokenizer.n_words}")

    matrices = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": norms, "weight_decay": 0.0}],
        lr=peak_lr,
        betas=(0.9, 0.95),
    )
    start = time.time()
    for step, (inputs, targets) in zip(range(steps), batches(tokenizer, rng, batch_size, max_len)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr, warmup=steps // 30)
        # Mixed precision where the CPU has bf16 instructions: fp32 weights and optimizer, bf16 products.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=CPU_BF16), FloatAttention():
            logits = model.logits(model.hidden_states(inputs, 0))
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.0f} s", flush=True)
        if (step + 1) % max(1, steps // 3) == 0:
            trained, new = (held_out_accuracy(model, tokenizer, phrasing) for phrasing in (False, True))
            print(f"held-out exact match: {trained:.1%} in trained phrasings, {new:.1%} in new ones", flush=True)

    # Meta ships bf16 weights; the library casts them to the runtime's dtype when loading.
    state_dict = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    params = {**PARAMS, "vocab_size": tokenizer.n_words}
    save_checkpoint(out, [state_dict], params)
    write_tokenizer_checksum(out)
    sharded = out.with_name(out.name + "-mp2")
    shutil.rmtree(sharded, ignore_errors=True)  # an earlier run's copy
    reshard(out, sharded, 2)  # copies tokenizer.model along
    write_tokenizer_checksum(sharded)
    print(f"trained in {time.time() - start:.0f} s; wrote {out} and {sharded}")


def write_tokenizer_checksum(folder: Path) -> None:
    with open(folder / "checklist.chk", "a") as checklist:
        checklist.write(f"{md5sum(folder / 'tokenizer.model')}  tokenizer.model\n")


if __name__ == "__main__":
    fire.Fire(main)
