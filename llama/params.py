"""params.json, the description of a Llama checkpoint: reading it, and what each field may hold.

Every field is checked for its type and range when a folder is opened, so that a mistake is
named there ("n_heads is \"6\", but it must be a positive integer") rather than found as a
trace from deep inside torch at the first forward pass.
"""

import json
import math
from pathlib import Path
from typing import Any

REQUIRED_PARAMS = ("dim", "n_layers", "n_heads")


def read_params(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: every Llama 2 checkpoint folder has a params.json")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); download it again") from err
    if not isinstance(params, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, found {type(params).__name__}")
    missing = [key for key in REQUIRED_PARAMS if key not in params]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {', '.join(missing)}: it is not a Llama params.json")
    return params


def check_params(params: dict[str, Any], source: str, names: dict[str, str] | None = None) -> None:
    """What params.json may hold: sizes are positive integers, rates positive finite numbers.

    names: what `source` calls each field, where it is not params.json (Hugging Face's config.json).
    """
    names = names or {}

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_positive(value: Any) -> bool:
        return (is_int(value) or isinstance(value, float)) and math.isfinite(value) and value > 0

    rules = {
        "dim": (lambda v: is_int(v) and v > 0, "a positive integer"),
        "n_layers": (lambda v: is_int(v) and v > 0, "a positive integer"),
        "n_heads": (lambda v: is_int(v) and v > 0, "a positive integer"),
        "n_kv_heads": (lambda v: v is None or (is_int(v) and v > 0), "a positive integer or null"),
        "vocab_size": (lambda v: is_int(v) and (v > 0 or v == -1), "a positive integer, or -1 for the tokenizer's"),
        "multiple_of": (lambda v: is_int(v) and v > 0, "a positive integer"),
        "ffn_dim_multiplier": (lambda v: v is None or is_positive(v), "a positive number or null"),
        "norm_eps": (is_positive, "a positive number"),
        "rope_theta": (is_positive, "a positive number"),
        "max_batch_size": (lambda v: is_int(v) and v > 0, "a positive integer"),
        "max_seq_len": (lambda v: is_int(v) and v > 0, "a positive integer"),
    }
    for field, (valid, expected) in rules.items():
        if field in params and not valid(params[field]):
            name = names.get(field, field)
            raise ValueError(f"{source}: {name} is {json.dumps(params[field])}, but it must be {expected}")
    if "dim" not in params or "n_heads" not in params:
        return
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    dim_name, heads_name = names.get("dim", "dim"), names.get("n_heads", "n_heads")
    if dim % n_heads or (dim // n_heads) % 2:
        raise ValueError(f"{source}: {dim_name} ({dim}) must be {heads_name} ({n_heads}) times an even head size")
    if n_heads % n_kv_heads:
        kv_name = names.get("n_kv_heads", "n_kv_heads")
        raise ValueError(f"{source}: {heads_name} ({n_heads}) must be a multiple of {kv_name} ({n_kv_heads})")
