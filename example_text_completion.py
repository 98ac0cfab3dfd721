"""Complete a few prompts; run with `torchrun --nproc_per_node MP example_text_completion.py --ckpt_dir ...`."""

from llama import Llama
from llama.cli import DEMO_MODEL_DIR, printable, run_script
from llama.runtime import is_main_process


def main(
    ckpt_dir: str = str(DEMO_MODEL_DIR),
    tokenizer_path: str | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: str | None = None,
    dtype: str | None = None,
    verify: bool = False,
    quantize: str | None = None,
):
    """With no --ckpt_dir, the demo model in models/; --tokenizer_path defaults to the checkpoint's.

    --verify checks the checkpoint against its checklist.chk before loading it; --quantize int8
    or int4 stores the weights as integers, quantized while loading (see llama.quantization).
    """
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
        verify=verify,
        quantize=quantize,
    )
    prompts = [
        # Plain continuations.
        "I believe the meaning of life is",
        "Simply put, the theory of relativity states that ",
        """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
        # A few-shot prompt: the examples show the model what to do with the last line.
        """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
    ]
    results = generator.text_completion(prompts, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    if is_main_process():
        for prompt, result in zip(prompts, results):
            print(prompt)
            print(f"> {printable(result['generation'])}")
            print("\n==================================\n")


if __name__ == "__main__":
    run_script(main)
