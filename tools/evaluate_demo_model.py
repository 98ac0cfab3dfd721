"""Exact-match accuracy of the demo model's greedy chat answers on questions training never saw.

python -m tools.evaluate_demo_model
torchrun --nproc_per_node 2 -m tools.evaluate_demo_model --ckpt_dir models/llama-2-demo-mp2
"""

from llama import Dialog, Llama
from llama.cli import DEMO_MODEL_DIR, run_script
from llama.runtime import is_main_process
from tools.demo_data import held_out_dialogs


def answer_all(generator: Llama, dialogs: list[Dialog], max_gen_len: int = 64) -> list[str]:
    """Greedy answers, in batches the model's cache can hold."""
    size = generator.model.params.max_batch_size
    answers = []
    for start in range(0, len(dialogs), size):
        results = generator.chat_completion(dialogs[start : start + size], temperature=0, max_gen_len=max_gen_len)
        answers += [r["generation"]["content"] for r in results]
    return answers


def main(
    ckpt_dir: str = str(DEMO_MODEL_DIR),
    tokenizer_path: str | None = None,
    questions: int = 200,
    max_batch_size: int = 20,
    device: str | None = None,
    dtype: str | None = None,
    quiet: bool = False,
) -> None:
    generator = Llama.build(
        ckpt_dir,
        tokenizer_path,
        max_seq_len=256,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
    )
    cases = held_out_dialogs(questions)
    answers = answer_all(generator, [dialog for dialog, _ in cases])
    correct = [answer == expected for answer, (_, expected) in zip(answers, cases)]
    if is_main_process():
        if not quiet:
            for ok, answer, (dialog, expected) in zip(correct, answers, cases):
                system = f"[{dialog[0]['content']}] " if dialog[0]["role"] == "system" else ""
                mark = "ok   " if ok else f"WRONG (expected {expected!r}) "
                print(f"{mark}{system}{dialog[-1]['content']} -> {answer}")
        print(f"exact match: {sum(correct)}/{len(cases)} = {sum(correct) / len(cases):.1%}")


if __name__ == "__main__":
    run_script(main)
