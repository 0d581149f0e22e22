"""Seeded fuzz of the `llada-moe generate` flags on a tiny folder, of `llada-moe convert` over damaged folders, of
random byte damage loaded through the Python API, and of the trainers' configs (issues 13 and 23).

    OMP_NUM_THREADS=1 python scripts/fuzz_cli.py --calls 80 --configs 120 --damage 60 --converts 12

Prints per surface `tried / ok / clear error / bad`. Bad: a hang past the timeout, an exit code other than 0 or 2, a
traceback or an exception other than our ValueError / TypeError (for the Python API: one that does not name the
damaged file), an exit 0 without a valid JSON result, a failed convert that changed its destination. Not part of the
pytest suite."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from modeling_llada_moe.apps import cli
from modeling_llada_moe.apps.tiny_task import save_tiny_folder
from trl_ext.sft import DiffusionSFTConfig
from trl_ext.vrpo import VRPOConfig


ROOT = Path(__file__).resolve().parents[1]



NUMBERS = ["0", "1", "2", "4", "0.5", "0.9", "1.5", "-1", "inf", "-inf", "nan", "1e9", "300", "x", "", "1e-300"]
FLAGS = {
    "--max-new-tokens": ["1", "4", "8", "16", "0", "-3", "300", "2.5", "x"],
    "--steps": ["1", "2", "3", "4", "8", "16", "0", "x"],
    "--block-length": ["1", "2", "3", "4", "8", "0", "x"],
    "--temperature": NUMBERS,
    "--top-k": ["1", "5", "200", "0", "x"],
    "--top-p": ["0.5", "1", "0", "1.5", "nan"],
    "--cfg-scale": NUMBERS,
    "--remasking": ["low_confidence", "random", "margin", "entropy", "best"],
    "--threshold": ["0.3", "0.9", "1", "0", "nan", "inf"],
    "--factor": ["0.5", "1", "inf", "nan", "0"],
    "--cache": ["none", "prefix", "dual", "full"],
    "--seed": ["0", "7", "-1", str(2**64), "x"],
    "--stop": ["t5", "", "t1 t2"],
    "--dtype": ["auto", "float32", "bfloat16", "int4"],
}
SWITCHES = ["--no-stop-at-eos", "--stop-at-eos", "--no-chat-template"]


def _tests_module(name: str):
    """`tests/<name>.py` as a module (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The tests' wall-clock limit (SIGALRM): `time_limit(seconds)` raises `Hang` past its budget.
_time_limit = _tests_module("time_limit")
Hang, time_limit = _time_limit.Hang, _time_limit.time_limit


def run_cli(argv: list[str], timeout: float, expect_json: bool = True) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        with time_limit(timeout), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as exit:
                code = exit.code
    except Hang as hang:
        return "bad", f"hang: {hang}"
    except Exception as error:  # an exception cli.main let through: a traceback for the user
        return "bad", f"{type(error).__name__}: {error}"
    stdout, stderr = out.getvalue(), err.getvalue()
    if code == 2 and "error:" in stderr and "Traceback" not in stderr:
        return "clear error", stderr.strip().splitlines()[-1]
    if code == 0 and not expect_json:
        return "ok", ""
    if code == 0:
        try:
            result = json.loads(stdout)
            valid = isinstance(result["text"], str) and result["nfe"] >= 1
            valid = valid and math.isfinite(result["tokens_per_forward"])
        except (ValueError, KeyError, TypeError):
            valid = False
        return ("ok", "") if valid else ("bad", f"exit 0 without a valid result: {stdout[:200]!r}")
    return "bad", f"exit {code}: {stderr[-300:]}"


def fuzz_cli(folder: Path, calls: int, rng: random.Random, timeout: float) -> Counter:
    counts = Counter()
    damaged = damaged_folders(folder)
    for _ in range(calls):
        flags = []
        for flag in rng.sample(sorted(FLAGS), rng.randint(0, 4)):
            flags += [flag, rng.choice(FLAGS[flag])]
        flags += rng.sample(SWITCHES, rng.randint(0, 1))
        model = folder if rng.random() < 0.85 else rng.choice(damaged)
        argv = ["generate", "--model", str(model), "t1 t2 t3", "--device", "cpu", "--json", *flags]
        outcome, detail = run_cli(argv, timeout)
        counts[outcome] += 1
        if outcome == "bad":
            print(f"BAD cli {argv[2:]}: {detail}")
    return counts


def damaged_folders(folder: Path) -> list[Path]:
    root = folder.parent / "damaged"
    config = json.loads((folder / "config.json").read_text())
    cases = {
        "empty-weights": ("model.safetensors", b""),
        "cut-weights": ("model.safetensors", None),
        "config": ("config.json", b"{"),
        "config-list": ("config.json", b"[1, 2]"),
        "config-null": ("config.json", b"null"),
        "generation": ("generation_config.json", b"[]"),
        "tokenizer": ("tokenizer.json", b"{}"),
        "template-syntax": ("chat_template.jinja", b"{% for m in messages %}{{ m['content'] }"),
        "template-raise": ("chat_template.jinja", b"{{ raise_exception('no') }}"),
        "layer-added": ("config.json", json.dumps({**config, "num_hidden_layers": 3, "moe_layer_freq": None})),
        "layer-removed": ("config.json", json.dumps({**config, "num_hidden_layers": 1, "moe_layer_freq": None})),
        "vocab-changed": ("config.json", json.dumps({**config, "vocab_size": 136})),
    }
    paths = []
    for name, (file, content) in cases.items():
        copy = shutil.copytree(folder, root / name)
        data = (copy / file).read_bytes()
        content = content.encode() if isinstance(content, str) else content
        (copy / file).write_bytes(content if content is not None else data[: len(data) // 2])
        paths.append(copy)
    return paths


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fuzz_convert(folder: Path, calls: int, rng: random.Random, timeout: float) -> Counter:
    """`convert` of the intact or a damaged folder, into a new folder or `--overwrite` over an earlier one: exit 0
    with a loadable folder, or exit 2 with the destination unchanged."""
    counts = Counter()
    damaged = damaged_folders(folder) if not (folder.parent / "damaged").exists() else sorted(
        (folder.parent / "damaged").iterdir()
    )
    earlier = folder.parent / "earlier"
    for i in range(calls):
        source = folder if rng.random() < 0.3 else rng.choice(damaged)
        overwrite = rng.random() < 0.5
        destination = earlier if overwrite else folder.parent / f"converted-{i}"
        if overwrite and not earlier.exists():
            shutil.copytree(folder, earlier)
            (earlier / "notes.txt").write_text("an earlier file")
        before = snapshot(destination) if destination.exists() else None
        flags = ["--overwrite"] if overwrite else []
        flags += rng.sample(["--no-verify", "--bits=8"], rng.randint(0, 1))
        outcome, detail = run_cli(["convert", str(source), str(destination), *flags], timeout, expect_json=False)
        if outcome == "ok":
            left = set(os.listdir(destination))
            if "notes.txt" in left or any(name.startswith(".llada-moe-") for name in left):
                outcome, detail = "bad", f"files of the earlier folder or of the staging left: {sorted(left)}"
        elif (snapshot(destination) if destination.exists() else None) != before:
            outcome, detail = "bad", f"a failed convert changed {destination}: {detail}"
        counts[outcome] += 1
        if outcome == "bad":
            print(f"BAD convert {source.name} {flags}: {detail}")
    return counts


def damage_bytes(data: bytes, limit: int, rng: random.Random) -> bytes:
    at = rng.randrange(limit)
    extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
    kind = rng.choice(["replace", "insert", "delete", "truncate"])
    if kind == "replace":
        return data[:at] + extra + data[at + len(extra) :]
    if kind == "insert":
        return data[:at] + extra + data[at:]
    if kind == "delete":
        return data[:at] + data[at + len(extra) :]
    return data[:at]


def fuzz_python_api(folder: Path, calls: int, rng: random.Random, timeout: float) -> Counter:
    """Random byte damage to config.json, generation_config.json or the safetensors header, loaded with
    `LLaDAMoEForMaskedLM.from_pretrained`: it loads, or a ValueError / TypeError names the damaged file."""
    import struct

    from modeling_llada_moe import LLaDAMoEForMaskedLM

    counts = Counter()
    work = shutil.copytree(folder, folder.parent / "api-damage")
    for _ in range(calls):
        file = rng.choice(["config.json", "generation_config.json", "model.safetensors"])
        original = (folder / file).read_bytes()
        limit = 8 + struct.unpack("<Q", original[:8])[0] if file.endswith(".safetensors") else len(original)
        (work / file).write_bytes(damage_bytes(original, limit, rng))
        try:
            with time_limit(timeout), contextlib.redirect_stderr(io.StringIO()):
                LLaDAMoEForMaskedLM.from_pretrained(work)
            outcome, detail = "ok", ""
        except (ValueError, TypeError) as err:
            named = str(work / file) in str(err)
            outcome, detail = ("clear error", "") if named else ("bad", f"does not name {file}: {err}")
        except Exception as err:
            outcome, detail = "bad", f"{type(err).__name__}: {err}"
        finally:
            (work / file).write_bytes(original)
        counts[outcome] += 1
        if outcome == "bad":
            print(f"BAD python api, damaged {file}: {detail[:300]}")
    return counts


SFT_VALUES = {
    "mask_token_id": [None, 0, 126, -1, 126.5, "126", True],
    "time_epsilon": [1e-3, 0.5, 0.0, 1.0, -0.1, float("nan"), float("inf"), "x", None],
    "random_length_prob": [0.0, 0.5, 1, 1.5, -0.1, float("nan"), "0.5", None],
    "loss_normalization": ["answer_length", "batch", "tokens", None, 3],
    "load_balance_coef": [0.0, 0.01, 1, -1.0, float("inf"), None, "0"],
    "z_loss_coef": [0.0, 1e-3, -1e-3, float("nan"), None],
    "stratified_t": [True, False, "no", 1, None],
    "eos_tail": [True, False, 0, "yes"],
    "assistant_only_loss": [None, True, False, "yes", 1],
}
VRPO_VALUES = {
    "beta": [0.1, 2, 0.0, -0.5, float("inf"), float("nan"), "0.1", None],
    "num_mc_samples": [1, 4, 8, 0, -2, 2.0, True, "4"],
    "num_timesteps": [None, 1, 2, 4, 3, 0, 2.0],
    "mask_token_id": [None, 126, -5, 126.5],
    "mask_seed": [0, 7, -1, 2**64, "0"],
    "time_epsilon": [1e-3, 0.0, 1.0, float("nan")],
    "load_balance_coef": [0.0, 0.5, -1.0, float("inf")],
    "z_loss_coef": [0.0, float("nan"), -0.1],
    "elbo_form": ["count", "time", "exact", None],
    "antithetic": [True, False, "no", None],
    "eos_tail": [True, False, 1],
}


def fuzz_config(cls, values: dict, calls: int, rng: random.Random, output_dir: str) -> Counter:
    counts = Counter()
    base = dict(output_dir=output_dir, report_to="none", bf16=False, use_cpu=True, save_strategy="no")
    for _ in range(calls):
        overrides = {name: rng.choice(values[name]) for name in rng.sample(sorted(values), rng.randint(1, 3))}
        try:
            args = cls(**base, **overrides)
        except (ValueError, TypeError) as err:
            named = any(f"{name}=" in str(err) for name in overrides) or "num_timesteps" in str(err)
            counts["clear error" if named else "bad"] += 1
            if not named:
                print(f"BAD {cls.__name__} {overrides}: error does not name the field: {err}")
            continue
        except Exception as err:
            counts["bad"] += 1
            print(f"BAD {cls.__name__} {overrides}: {type(err).__name__}: {err}")
            continue
        if all(getattr(args, name) == value or value != value for name, value in overrides.items()):
            counts["ok"] += 1
        else:
            counts["bad"] += 1
            print(f"BAD {cls.__name__} {overrides}: accepted but changed")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=80, help="CLI calls")
    parser.add_argument("--configs", type=int, default=120, help="calls per trainer config class")
    parser.add_argument("--damage", type=int, default=60, help="damaged folders loaded through the Python API")
    parser.add_argument("--converts", type=int, default=12, help="convert calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per CLI call before it counts as a hang")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_folder(Path(tmp) / "tiny", max_new_tokens=8, block_length=4)
        results = {
            "cli generate": fuzz_cli(folder, args.calls, rng, args.timeout),
            "cli convert": fuzz_convert(folder, args.converts, rng, args.timeout),
            "from_pretrained damage": fuzz_python_api(folder, args.damage, rng, args.timeout),
            "DiffusionSFTConfig": fuzz_config(DiffusionSFTConfig, SFT_VALUES, args.configs, rng, tmp),
            "VRPOConfig": fuzz_config(VRPOConfig, VRPO_VALUES, args.configs, rng, tmp),
        }
    print(f"{'surface':<24} tried / ok / clear error / bad")
    for surface, counts in results.items():
        tried = sum(counts.values())
        print(f"{surface:<24} {tried} / {counts['ok']} / {counts['clear error']} / {counts['bad']}")


if __name__ == "__main__":
    main()
