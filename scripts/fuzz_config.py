"""Fuzz `LLaDAMoEConfig` (keyword arguments, and config.json files read by `from_pretrained`) with seeded random
field values of many types; print per surface: tried / ok / clear error / bad.

ok: the config builds, its fields have their declared types and ranges, it round-trips through `to_dict`, and (when
small) the model it describes builds and runs to finite logits. clear error: a `TypeError` / `ValueError` raised by
the config (or by the shared field checks it declares, `modeling_llada_moe/validators.py`) that names a field, its
value and what is accepted. bad: anything else (a traceback from inside transformers or torch, an error that names no
field, a hang past the timeout, or a built config that breaks an invariant).

    python scripts/fuzz_config.py [--calls 300] [--seed 0]
"""

import argparse
import importlib.util
import json
import math
import random
import re
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM
from modeling_llada_moe.apps.tiny_task import TINY_CONFIG


ROOT = Path(__file__).resolve().parents[1]


def official_config_dict(**overrides) -> dict:
    """The official-layout config dict of the tests' reference module (tests/official_reference.py)."""
    spec = importlib.util.spec_from_file_location("official_reference", ROOT / "tests" / "official_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.official_config_dict(**overrides)




FIELDS = [
    "vocab_size", "hidden_size", "dense_intermediate_size", "expert_intermediate_size",
    "shared_expert_intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "mask_token_id", "tie_word_embeddings", "attention_bias", "attention_dropout",
    "clip_qkv", "qk_layernorm", "num_experts", "num_experts_per_tok", "moe_layer_freq", "norm_topk_prob",
    "routed_scaling_factor", "moe_router_score_function", "moe_router_enable_expert_bias", "router_num_group",
    "router_topk_group", "output_router_logits", "router_aux_loss_coef", "router_z_loss_coef", "rope_theta",
    "partial_rotary_factor", "rope_parameters", "rope_scaling", "num_local_experts", "head_dim",
]  # fmt: skip
EXTRA_KEYS = ["hiden_size", "temperature", "torch_dtype", "auto_map", "is_decoder", "foo"]
NAMED = re.compile(r"LLaDAMoEConfig: `([a-z_.]+)`=")
# Where a clear error is raised: the config's file, or the shared checks its fields declare.
CONFIG_FILES = ("configuration_llada_moe.py", "validators.py")
TIMEOUT_S = 10


# Values each field accepts with the tiny config around it, drawn half of the time so that built configs (and the
# models they describe) are exercised too.
VALID = {
    "vocab_size": [128, 200, 1000],
    "hidden_size": [32, 64, 128],
    "dense_intermediate_size": [8, 96],
    "expert_intermediate_size": [8, 32],
    "shared_expert_intermediate_size": [None, 16],
    "num_hidden_layers": [2],
    "num_attention_heads": [2, 4, 8],
    "num_key_value_heads": [None, 1, 2, 4],
    "hidden_act": ["silu", "gelu", "relu"],
    "max_position_embeddings": [16, 256],
    "initializer_range": [0.0, 0.02, 1],
    "rms_norm_eps": [1e-6, 1e-5, 1],
    "pad_token_id": [None, 0, 120, 127],
    "bos_token_id": [None, 1],
    "eos_token_id": [None, 120, [120, 121]],
    "mask_token_id": [None, 126, 5],
    "attention_dropout": [0.0, 0.5],
    "clip_qkv": [None, 8.0, 1],
    "num_experts": [8, 16],
    "num_experts_per_tok": [1, 2, 8],
    "moe_layer_freq": [[1, 1], [0, 1], [0, 0]],
    "routed_scaling_factor": [1, 2.5],
    "moe_router_score_function": ["softmax", "sigmoid"],
    "router_num_group": [None],
    "router_topk_group": [None],
    "router_aux_loss_coef": [0, 0.01],
    "router_z_loss_coef": [0, 0.001],
    "rope_theta": [10000, 50000.0],
    "partial_rotary_factor": [0.5, 1.0],
    "rope_parameters": [None, {"rope_type": "default", "rope_theta": 10000.0}],
    "rope_scaling": [None, {"rope_type": "linear", "factor": 2.0}],
    "num_local_experts": [8],
    "head_dim": [None, 16],
}


def random_value(rng: random.Random, field: str):
    if rng.random() < 0.5:
        return rng.choice(VALID.get(field, [True, False]))
    pools = [
        lambda: rng.randint(-3, 140),
        lambda: rng.choice([0, 1, 2, 4, 8, 16, 32, 64, 96, 120, 126, 127, 128, 500, 2**40]),
        lambda: rng.choice([0.0, 0.5, 1.0, 2.0, 4.0, -0.02, 1e-5, 0.02, 50000.0, 1e300, -1.0, 1e-300, 1e-40, 1e6]),
        lambda: rng.choice([math.inf, -math.inf, math.nan]),
        lambda: rng.choice([True, False, None]),
        lambda: rng.choice(["", "x", "silu", "gelu", "relu", "softmax", "sigmoid", "no", "yes", "1", "2.0"]),
        lambda: [rng.randint(-1, 2) for _ in range(rng.randint(0, 3))],
        lambda: rng.choice([[1, 1], [0, 1], [1.0, 1], [True, 1], (1, 1), [120], [120, 500], []]),
        lambda: rng.choice(
            [
                {"rope_type": "default", "rope_theta": 10000.0},
                {"rope_type": "linear", "factor": 2.0},
                {"rope_type": "linear"},
                {"rope_type": "linear", "factor": rng.choice([0.0, math.nan, 1e-38, 0.5, -2.0])},
                {"rope_type": "dynamic", "factor": rng.choice([0.0, math.nan, 1e20, 4.0])},
                {"rope_type": "nope"},
                {"rope_type": 3},
                {"rope_theta": "x"},
                "default",
            ]
        ),
    ]
    return rng.choice(pools)()


def expire(signum, frame):
    raise TimeoutError(f"no answer after {TIMEOUT_S} s")


def check_config(config: LLaDAMoEConfig) -> str | None:
    """What is wrong with a config that built, or None."""
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts"):
        value = getattr(config, field)
        if type(value) is not int or value <= 0:
            return f"{field}={value!r} accepted"
    for field in ("initializer_range", "rms_norm_eps", "routed_scaling_factor", "attention_dropout"):
        if not math.isfinite(getattr(config, field)) or getattr(config, field) < 0:
            return f"{field}={getattr(config, field)!r} accepted"
    for field in ("qk_layernorm", "use_cache", "attention_bias", "tie_word_embeddings", "norm_topk_prob"):
        if type(getattr(config, field)) is not bool:
            return f"{field}={getattr(config, field)!r} accepted"
    defaults = {"pad_token_id": 156892, "eos_token_id": 156892, "mask_token_id": 156895, "bos_token_id": None}
    for field, default in defaults.items():
        value = getattr(config, field)
        if value == default or value is None:
            continue
        for token in value if isinstance(value, list) else [value]:
            if type(token) is not int or not 0 <= token < config.vocab_size:
                return f"{field}={value!r} accepted with vocab_size={config.vocab_size}"
    theta = config.rope_parameters["rope_theta"]
    if not (math.isfinite(theta) and theta >= 1):
        return f"rope_theta={theta!r} accepted"
    if LLaDAMoEConfig(**config.to_dict()).to_dict() != config.to_dict():
        return "to_dict does not round-trip"
    if config.vocab_size * config.hidden_size * config.num_experts * config.num_hidden_layers < 2e7:
        torch.manual_seed(0)
        model = LLaDAMoEForMaskedLM(config).eval()
        with torch.no_grad():
            logits = model(torch.randint(0, config.vocab_size, (1, 5))).logits
        if logits.shape != (1, 5, config.vocab_size):
            return f"logits of shape {tuple(logits.shape)}"
        if not torch.isfinite(logits).all():
            return "logits that are not finite"
    return None


def classify(call) -> tuple[str, str]:
    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT_S)
    try:
        config = call()
        problem = check_config(config)
        return ("bad", problem) if problem else ("ok", "")
    except (TypeError, ValueError) as err:
        frames = traceback.extract_tb(err.__traceback__)
        ours = frames and Path(frames[-1].filename).name in CONFIG_FILES
        if ours and NAMED.search(str(err)):
            return "clear", ""
        return "bad", f"{type(err).__name__}: {err} (raised in {frames[-1].filename if frames else '?'})"
    except Exception as err:  # noqa: BLE001 (a fuzz classifies every failure)
        return "bad", f"{type(err).__name__}: {err}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per surface")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp())

    def kwargs_call():
        overrides = {field: random_value(rng, field) for field in rng.sample(FIELDS, rng.randint(1, 3))}
        if rng.random() < 0.1:
            overrides[rng.choice(EXTRA_KEYS)] = random_value(rng, "")
        return overrides, lambda: LLaDAMoEConfig(**{**TINY_CONFIG, **overrides})

    def file_call():
        data = official_config_dict()
        overrides = {field: random_value(rng, field) for field in rng.sample(FIELDS, rng.randint(1, 2))}
        data.update(overrides)
        try:
            (folder / "config.json").write_text(json.dumps(data, allow_nan=True))
        except (TypeError, ValueError):  # not JSON-writable (a tuple key, ...): write it another way
            (folder / "config.json").write_text(json.dumps(data, default=str, allow_nan=True))
        return overrides, lambda: LLaDAMoEConfig.from_pretrained(folder)

    surfaces = {"LLaDAMoEConfig(**kwargs)": kwargs_call, "LLaDAMoEConfig.from_pretrained(config.json)": file_call}
    total_bad = 0
    for name, make in surfaces.items():
        counts = {"ok": 0, "clear": 0, "bad": 0}
        examples = []
        for _ in range(args.calls):
            overrides, call = make()
            outcome, detail = classify(call)
            counts[outcome] += 1
            if outcome == "bad" and len(examples) < 10:
                examples.append(f"  {overrides!r}: {detail}")
        total_bad += counts["bad"]
        print(f"{name}: tried {args.calls} / ok {counts['ok']} / clear error {counts['clear']} / bad {counts['bad']}")
        print("\n".join(examples)) if examples else None
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
