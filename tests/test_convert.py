"""python -m llama.convert: Meta to Hugging Face and back, bit-exact, loadable by transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama.bench import random_state_dict
from llama.checkpoint import save_checkpoint
from llama.convert import main, to_hugging_face
from tests.helpers import GROUPED_QUERY, ROOT, TOKENS, environment, logits_of, model_args, split_state_dict


def test_exported_folder_has_hugging_face_layout(hugging_face: Path) -> None:
    names = sorted(p.name for p in hugging_face.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((hugging_face / "config.json").read_text())
    assert config["intermediate_size"] == 224 and config["num_key_value_heads"] == 2
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert "model.layers.1.self_attn.q_proj.weight" in load_file(hugging_face / "model.safetensors")


def test_meta_to_hugging_face_to_meta_is_bit_exact(tokenizer_path: str, tmp_path: Path) -> None:
    args = model_args(GROUPED_QUERY, 400)
    original = split_state_dict(random_state_dict(args, seed=3, dtype=torch.bfloat16), args, 2)
    save_checkpoint(tmp_path / "meta", original, GROUPED_QUERY)
    main(str(tmp_path / "meta"), str(tmp_path / "hf"), tokenizer_path=tokenizer_path)
    main(str(tmp_path / "hf"), str(tmp_path / "back"), model_parallel_size=2)
    for rank, shard in enumerate(original):
        back = torch.load(tmp_path / "back" / f"consolidated.0{rank}.pth", weights_only=True)
        assert back.keys() == shard.keys()
        for key, tensor in shard.items():
            assert back[key].dtype == torch.bfloat16 and torch.equal(back[key], tensor), key
    # Hugging Face keeps only the feed-forward width, so its rounding comes back in another form.
    params = json.loads((tmp_path / "back" / "params.json").read_text())
    assert params == {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "multiple_of": 224,
        "norm_eps": 1e-6,
        "vocab_size": 400,
        "rope_theta": 500000.0,
    }
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()


def test_transformers_loads_the_exported_folder_and_agrees(
    hugging_face: Path, checkpoint: Path, tokenizer_path: str
) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(hugging_face, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model(TOKENS).logits
    torch.testing.assert_close(logits_of(checkpoint, tokenizer_path), theirs, atol=1e-4, rtol=1e-4)


def test_export_needs_a_tokenizer(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer.model in .* or its parent folder: pass --tokenizer_path"):
        to_hugging_face(checkpoint, tmp_path / "hf")


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llama.convert", *args], cwd=ROOT, env=environment(), capture_output=True, text=True
    )


def test_the_command_converts_hugging_face_to_meta_and_back(
    checkpoint: Path, tokenizer_path: str, tmp_path: Path
) -> None:
    """As users run it, python -m: the module is then __main__, a second copy of itself."""
    done = convert(str(checkpoint), str(tmp_path / "hf"), "--tokenizer_path", tokenizer_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote Hugging Face's format to {tmp_path / 'hf'}\n"
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    for shards in (1, 2):
        out = tmp_path / f"meta-mp{shards}"
        flags = ["--model_parallel_size", str(shards)] if shards > 1 else []
        done = convert(str(tmp_path / "hf"), str(out), *flags)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"wrote Meta's format with {shards} shard(s) to {out}\n"
        files = sorted(p.name for p in out.iterdir())
        assert files == sorted(
            ["checklist.chk", "params.json", "tokenizer.model"] + [f"consolidated.0{i}.pth" for i in range(shards)]
        )
        assert torch.equal(logits_of(out, tokenizer_path), logits_of(checkpoint, tokenizer_path))


def test_the_command_refuses_to_cut_a_hugging_face_export(
    checkpoint: Path, tokenizer_path: str, tmp_path: Path
) -> None:
    done = convert(
        str(checkpoint), str(tmp_path / "hf"), "--tokenizer_path", tokenizer_path, "--model_parallel_size", "2"
    )
    assert done.returncode == 1
    assert done.stderr == (
        "error: --model_parallel_size applies when writing Meta's format: a Hugging Face folder is not cut\n"
    )
    assert not (tmp_path / "hf").exists()
