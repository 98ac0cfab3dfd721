"""How often the demo model answers questions training never saw: held-out problems asked in the
trained phrasings, and held-out problems asked only in phrasings training never saw.

python -m tools.evaluate_demo_model
torchrun --nproc_per_node 2 -m tools.evaluate_demo_model --ckpt_dir models/llama-2-demo-mp2

For each set: exact match of the whole worked answer, and of the final number alone.
"""

import re

from llama import Dialog, Llama
from llama.cli import DEMO_MODEL_DIR, run_script
from llama.runtime import is_main_process
from tools.demo_data import held_out_dialogs

SETS = {"trained phrasings": False, "held-out phrasings": True}


def answer_all(generator: Llama, dialogs: list[Dialog], max_gen_len: int = 64) -> list[str]:
    """Greedy answers, in batches the model's cache can hold."""
    size = generator.model.params.max_batch_size
    answers = []
    for start in range(0, len(dialogs), size):
        results = generator.chat_completion(dialogs[start : start + size], temperature=0, max_gen_len=max_gen_len)
        answers += [r["generation"]["content"] for r in results]
    return answers


def final_number(text: str) -> str | None:
    """The number after the last "=" of an answer ("..., so 66 + 49 = 115." -> "115")."""
    found = re.findall(r"=\s*(-?\d+)", text)
    return found[-1] if found else None


def main(
    ckpt_dir: str = str(DEMO_MODEL_DIR),
    tokenizer_path: str | None = None,
    questions: int = 200,
    max_batch_size: int = 20,
    device: str | None = None,
    dtype: str | None = None,
    quiet: bool = False,
    quantize: str | None = None,
) -> None:
    generator = Llama.build(
        ckpt_dir,
        tokenizer_path,
        max_seq_len=512,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
        quantize=quantize,
    )
    lines = []
    for name, held_out_phrasing in SETS.items():
        cases = held_out_dialogs(questions, held_out_phrasing=held_out_phrasing)
        answers = answer_all(generator, [dialog for dialog, _ in cases])
        exact = [answer == expected for answer, (_, expected) in zip(answers, cases)]
        number = [final_number(answer) == final_number(expected) for answer, (_, expected) in zip(answers, cases)]
        if is_main_process() and not quiet:
            for ok, answer, (dialog, expected) in zip(exact, answers, cases):
                system = f"[{dialog[0]['content']}] " if dialog[0]["role"] == "system" else ""
                mark = "ok   " if ok else f"WRONG (expected {expected!r}) "
                print(f"{name}: {mark}{system}{dialog[-1]['content']} -> {answer}")
        lines.append(
            f"{name}: exact match {sum(exact)}/{len(cases)} = {sum(exact) / len(cases):.1%}, "
            f"final number {sum(number)}/{len(cases)} = {sum(number) / len(cases):.1%}"
        )
    if is_main_process():
        print("\n".join(lines))


if __name__ == "__main__":
    run_script(main)
