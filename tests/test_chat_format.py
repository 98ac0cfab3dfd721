"""The Llama 2 chat format on token ids alone, without a model."""

from llama.chat_format import B_INST, B_SYS, E_INST, E_SYS, encode_dialog
from llama.tokenizer import Tokenizer


def test_chat_format_without_system_prompt(tokenizer: Tokenizer) -> None:
    dialog = [{"role": "user", "content": "  Hi there  "}]
    expected = tokenizer.encode(f"{B_INST} Hi there {E_INST}", bos=True, eos=False)
    assert encode_dialog(tokenizer, dialog) == expected
    assert expected[0] == tokenizer.bos_id and tokenizer.decode(expected) == "[INST] Hi there [/INST]"


def test_chat_format_with_system_prompt_and_several_turns(tokenizer: Tokenizer) -> None:
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello. "},
        {"role": "user", "content": "Sum 2 and 3"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Thanks"},
    ]
    first = f"{B_INST} {B_SYS}Be brief.{E_SYS}Hi {E_INST} Hello. "
    expected = tokenizer.encode(first, bos=True, eos=True)
    expected += tokenizer.encode(f"{B_INST} Sum 2 and 3 {E_INST} 5 ", bos=True, eos=True)
    expected += tokenizer.encode(f"{B_INST} Thanks {E_INST}", bos=True, eos=False)
    ids = encode_dialog(tokenizer, dialog)
    assert ids == expected
    assert ids.count(tokenizer.bos_id) == 3 and ids.count(tokenizer.eos_id) == 2
    assert tokenizer.decode(ids[: ids.index(tokenizer.eos_id)]).startswith("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi")
