"""Issue 13, item 7 and the trainers' configs: the `llada-moe` command line on damaged folders and bad flags, and
`DiffusionSFTConfig` / `VRPOConfig` on bad field values.

Every damaged-folder case exits 2 with `error: ...` naming the damaged file (or the tokenizer folder), never with a
traceback from safetensors or tokenizers, never "the Hub could not serve it", and never by silently loading defaults.
A hypothesis property test over `generate` flags (fixed example budget, a wall-clock guard per example) checks that
every call either answers (exit 0, a valid JSON result) or exits 2 with `error:`."""

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from time_limit import time_limit

from modeling_llada_moe import LLaDAMoEForMaskedLM
from modeling_llada_moe.apps import cli
from modeling_llada_moe.apps.inference import load_model_and_tokenizer
from modeling_llada_moe.apps.tiny_task import save_tiny_folder
from trl_ext.sft import DiffusionSFTConfig
from trl_ext.vrpo import VRPOConfig


FAST = ["--device", "cpu", "--no-chat-template", "--no-stream"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny chat model folder whose generation_config.json asks for 8 tokens in blocks of 4."""
    return save_tiny_folder(tmp_path_factory.mktemp("good"), max_new_tokens=8, block_length=4)


def damaged(folder: Path, tmp_path: Path, name: str, content: bytes | None = None, keep: int | None = None) -> Path:
    """A copy of `folder` with file `name` replaced by `content` or cut to its first `keep` bytes."""
    copy = shutil.copytree(folder, tmp_path / "damaged")
    target = copy / name
    target.write_bytes(content if content is not None else target.read_bytes()[:keep])
    return copy


def run_cli(*argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `llada-moe ARGV` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(arg) for arg in argv])
        except SystemExit as exit:  # argparse: bad flags
            code = exit.code
    return code, out.getvalue(), err.getvalue()


def assert_clear_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    # A line of its own, ours ("error: ...") or argparse's ("llada-moe generate: error: ..."), not text in a traceback.
    assert any(re.match(r"(llada-moe[a-z ]*: )?error: ", line) for line in err.splitlines()), err
    assert "Traceback" not in err and "SafetensorError" not in err and "Hub could not serve" not in err, err
    for word in words:
        assert word in err, (word, err)


# ----------------------------------------------------------------------------------------------------------------
# Damaged folders
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 7, 1000, -64], ids=["empty", "shorter-than-header", "truncated", "tail-cut"])
def test_damaged_safetensors_exit_2_naming_the_file(folder, tmp_path, keep):
    size = (folder / "model.safetensors").stat().st_size
    bad = damaged(folder, tmp_path, "model.safetensors", keep=keep % size if keep < 0 else keep)
    for command in (["generate", "--model", bad, "t1 t2", *FAST], ["convert", bad, tmp_path / "out"]):
        code, _, err = run_cli(*command)
        assert_clear_error(code, err, str(bad / "model.safetensors"), "corrupt weights file")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="model.safetensors' is a corrupt weights file"):
        load_model_and_tokenizer(bad, device="cpu")


def test_corrupt_sharded_index_and_missing_shard_are_named(folder, tmp_path):
    model = LLaDAMoEForMaskedLM.from_pretrained(folder)
    sharded = save_tiny_folder(tmp_path / "sharded", model=model)
    for path in sharded.glob("*.safetensors"):
        path.unlink()
    model.save_pretrained(sharded, max_shard_size="200KB")
    index = sharded / "model.safetensors.index.json"
    assert index.exists()
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    code, _, err = run_cli("generate", "--model", sharded, "t1", *FAST)
    assert_clear_error(code, err, str(shard))
    index.write_text("{")
    code, _, err = run_cli("generate", "--model", sharded, "t1", *FAST)
    assert_clear_error(code, err, str(index), "corrupt weights index")


@pytest.mark.parametrize("content", [b"{bad", b"", b"[1, 2]", b"\xff\xfe"], ids=["syntax", "empty", "list", "bytes"])
def test_corrupt_config_json_is_a_corrupt_file_not_a_hub_failure(folder, tmp_path, content):
    bad = damaged(folder, tmp_path, "config.json", content)
    for command in (["generate", "--model", bad, "t1 t2", *FAST], ["convert", bad, tmp_path / "out"]):
        code, _, err = run_cli(*command)
        assert_clear_error(code, err, str(bad / "config.json"), "corrupt model config")
    with pytest.raises(ValueError, match="config.json' is a corrupt model config"):
        load_model_and_tokenizer(bad, device="cpu")


def test_wrongly_typed_config_field_exits_2_naming_the_field(folder, tmp_path):
    config = json.loads((folder / "config.json").read_text())
    bad = damaged(folder, tmp_path, "config.json", json.dumps({**config, "num_hidden_layers": 2.0}).encode())
    code, _, err = run_cli("generate", "--model", bad, "t1 t2", *FAST)
    assert_clear_error(code, err, "num_hidden_layers")


def test_corrupt_generation_config_is_an_error_not_defaults(folder, tmp_path):
    bad = damaged(folder, tmp_path, "generation_config.json", b'{"max_new_tokens": 8,')
    code, out, err = run_cli("generate", "--model", bad, "t1 t2", *FAST, "--json")
    assert_clear_error(code, err, str(bad / "generation_config.json"), "corrupt generation config")
    assert not out  # before: exit 0 with 128 tokens (the defaults) instead of 8
    code, _, err = run_cli("convert", bad, tmp_path / "out")
    assert_clear_error(code, err, str(bad / "generation_config.json"))
    with pytest.raises(ValueError, match="generation_config.json"):
        load_model_and_tokenizer(bad, device="cpu")
    # The good folder still answers with its own 8 tokens.
    code, out, err = run_cli("generate", "--model", folder, "t1 t2", *FAST, "--json")
    assert code == 0 and json.loads(out)["generated_tokens"] <= 8, err


@pytest.mark.parametrize(
    "name, content, word",
    [
        ("tokenizer.json", b"{bad", "tokenizer.json' is a corrupt tokenizer file"),
        ("tokenizer_config.json", b"not json", "tokenizer_config.json' is a corrupt tokenizer file"),
        ("tokenizer.json", b"{}", "could not load a tokenizer"),
    ],
    ids=["tokenizer-syntax", "config-syntax", "not-a-tokenizer"],
)
def test_tokenizer_errors_name_the_folder_or_file(folder, tmp_path, name, content, word):
    bad = damaged(folder, tmp_path, name, content)
    code, _, err = run_cli("generate", "--model", bad, "t1 t2", *FAST)
    assert_clear_error(code, err, str(bad), word)
    code, _, err = run_cli("generate", "--model", folder, "--tokenizer", bad, "t1 t2", *FAST)
    assert_clear_error(code, err, str(bad), word)


def test_convert_with_a_corrupt_tokenizer_fails_instead_of_dropping_it(folder, tmp_path):
    bad = damaged(folder, tmp_path, "tokenizer.json", b"{bad")
    code, out, err = run_cli("convert", bad, tmp_path / "out", "--no-verify")
    assert_clear_error(code, err, str(bad / "tokenizer.json"), "--tokenizer PATH")
    assert not (tmp_path / "out").exists() and "without tokenizer" not in out


def test_convert_mask_token_id_updates_both_configs(folder, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli("convert", folder, out, "--mask-token-id", 125)
    assert code == 0 and "logits identical" in stdout, err
    assert json.loads((out / "config.json").read_text())["mask_token_id"] == 125
    assert json.loads((out / "generation_config.json").read_text())["mask_token_id"] == 125  # before: still 126
    model = LLaDAMoEForMaskedLM.from_pretrained(out)
    assert model._resolve_generation_config(None, {}).mask_token_id == 125  # what diffusion_generate decodes with


@pytest.mark.parametrize(
    "value, words",
    [
        (120, ["--mask-token-id=120 equals pad_token_id"]),  # pad = eos = 120 in the tiny vocabulary
        (128, ["--mask-token-id=128 is not in the vocabulary [0, 128)"]),
        (10**6, ["--mask-token-id=1000000 is not in the vocabulary"]),
        (-1, ["--mask-token-id", "'-1' is not a token id"]),
        ("x", ["--mask-token-id", "'x' is not a token id"]),
    ],
)
def test_convert_rejects_a_mask_id_equal_to_pad_or_outside_the_vocabulary(folder, tmp_path, value, words):
    code, _, err = run_cli("convert", folder, tmp_path / "out", "--mask-token-id", value)
    assert_clear_error(code, err, *words)
    assert not (tmp_path / "out").exists()


def test_convert_rejects_a_bad_max_shard_size(folder, tmp_path):
    code, _, err = run_cli("convert", folder, tmp_path / "out", "--max-shard-size", "lots")
    assert_clear_error(code, err, "--max-shard-size", "'lots'")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--cfg-scale", "inf"),  # with --factor 1 this hung forever
        ("--cfg-scale", "nan"),
        ("--temperature", "inf"),
        ("--temperature", "nan"),
        ("--factor", "inf"),
        ("--factor", "nan"),
        ("--threshold", "nan"),
        ("--top-p", "nan"),
        ("--seed", str(2**64)),
        ("--seed", "-1"),
    ],
)
def test_non_finite_or_out_of_range_flags_exit_2_naming_the_flag(folder, flag, value):
    extra = ["--factor", "1"] if flag == "--cfg-scale" else []
    code, out, err = run_cli("generate", "--model", folder, "t1 t2", *FAST, flag, value, *extra)
    assert_clear_error(code, err, f"argument {flag}", repr(value))
    assert not out


# ----------------------------------------------------------------------------------------------------------------
# Property test over `generate` flags
# ----------------------------------------------------------------------------------------------------------------


NUMBERS = ["0", "1", "2", "4", "0.5", "0.9", "1.5", "-1", "inf", "-inf", "nan", "1e9", "300", "x", ""]
FLAG_VALUES = {
    "--max-new-tokens": ["1", "4", "8", "16", "0", "-3", "300", "2.5", "x"],
    "--steps": ["1", "2", "4", "8", "16", "0", "x"],
    "--block-length": ["1", "2", "4", "8", "0", "x"],
    "--temperature": NUMBERS,
    "--top-k": ["1", "5", "0", "x"],
    "--top-p": ["0.5", "1", "0", "1.5", "nan"],
    "--cfg-scale": NUMBERS,
    "--remasking": ["low_confidence", "random", "margin", "entropy", "best"],
    "--threshold": ["0.3", "0.9", "1", "0", "nan", "inf"],
    "--factor": ["0.5", "1", "inf", "nan", "0"],
    "--cache": ["none", "prefix", "dual", "full"],
    "--seed": ["0", "7", "-1", str(2**64), "x"],
    "--stop": ["t5", ""],
}


def check_generate_flags(folder: Path, flags: list[str]) -> str:
    """'ok' or 'error' for `llada-moe generate` with `flags`; an AssertionError for anything else."""
    with time_limit(30):
        code, out, err = run_cli("generate", "--model", folder, "t1 t2 t3", *FAST, "--json", *flags)
    if code == 0:
        result = json.loads(out)
        assert isinstance(result["text"], str) and result["nfe"] >= 1 and math.isfinite(result["tokens_per_forward"])
        assert 0 <= result["generated_tokens"] <= 300, result
        return "ok"
    assert code == 2, (flags, code, err)
    assert "error:" in err and "Traceback" not in err, (flags, err)
    return "error"


flag_sets = st.lists(
    st.sampled_from(sorted(FLAG_VALUES)).flatmap(
        lambda flag: st.tuples(st.just(flag), st.sampled_from(FLAG_VALUES[flag]))
    ),
    max_size=4,
    unique_by=lambda pair: pair[0],
)


@settings(deadline=None, max_examples=30, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=flag_sets)
def test_generate_flags_answer_or_exit_2(folder, pairs):
    check_generate_flags(folder, [item for pair in pairs for item in pair])


@st.composite
def valid_flag_sets(draw) -> list[str]:
    """Flags that are each valid and valid together: a block length dividing the new tokens, steps a multiple of the
    blocks (at most one per token), top-k / top-p only when sampling, threshold or factor (exclusive rules)."""
    tokens = draw(st.sampled_from([4, 8, 16]))
    block = draw(st.sampled_from([b for b in (1, 2, 4, 8) if tokens % b == 0]))
    steps = draw(st.sampled_from(range(tokens // block, tokens + 1, tokens // block)))
    flags = ["--max-new-tokens", str(tokens), "--block-length", str(block), "--steps", str(steps)]
    temperature = draw(st.sampled_from(["0", "0.5", "1", "1.5"]))
    flags += ["--temperature", temperature]
    if temperature != "0":
        flags += draw(st.sampled_from([[], ["--top-k", "1"], ["--top-k", "5"], ["--top-p", "0.5"], ["--top-p", "1"]]))
    flags += draw(st.sampled_from([[], ["--threshold", "0.3"], ["--threshold", "1"], ["--factor", "0.5"]]))
    for flag, values in {
        "--cfg-scale": ["0", "0.5", "2"],
        "--remasking": ["low_confidence", "random", "margin", "entropy"],
        "--cache": ["none", "prefix", "dual"],
        "--seed": ["0", "7"],
        "--stop": ["t5"],
    }.items():
        if draw(st.booleans()):
            flags += [flag, draw(st.sampled_from(values))]
    return flags


@settings(deadline=None, max_examples=12, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=valid_flag_sets())
def test_valid_generate_flags_answer(folder, flags):
    # The property test above accepts a clear error for any flags, so a CLI that refused everything would pass it.
    assert check_generate_flags(folder, flags) == "ok", flags


# ----------------------------------------------------------------------------------------------------------------
# Trainers' configs
# ----------------------------------------------------------------------------------------------------------------


def sft_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, save_strategy="no")
    return DiffusionSFTConfig(**{**settings, **overrides})


def vrpo_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, save_strategy="no")
    return VRPOConfig(**{**settings, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [
        dict(mask_token_id=126.5),
        dict(mask_token_id="126"),
        dict(mask_token_id=True),
        dict(mask_token_id=-1),
        dict(loss_normalization="tokens"),
        dict(loss_normalization=None),
        dict(random_length_prob=1.5),
        dict(random_length_prob=-0.1),
        dict(random_length_prob=float("nan")),
        dict(random_length_prob="0.5"),
        dict(time_epsilon=0.0),
        dict(time_epsilon=float("nan")),
        dict(time_epsilon="x"),
        dict(load_balance_coef=-0.01),
        dict(load_balance_coef=float("inf")),
        dict(z_loss_coef=-1.0),
        dict(z_loss_coef=None),
        dict(stratified_t="no"),
        dict(eos_tail=1),
        dict(assistant_only_loss="yes"),
    ],
    ids=repr,
)
def test_sft_config_rejects_bad_fields_naming_them(tmp_path, overrides):
    ((name, value),) = overrides.items()
    with pytest.raises(ValueError, match=f"^{name}="):
        sft_config(tmp_path, **overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(beta=0.0),
        dict(beta=-0.1),
        dict(beta=float("inf")),
        dict(beta=float("nan")),
        dict(beta="0.1"),
        dict(num_mc_samples=0),
        dict(num_mc_samples=2.0),
        dict(num_mc_samples=True),
        dict(num_timesteps=0),
        dict(num_timesteps=1.0),
        dict(mask_token_id=126.5),
        dict(mask_token_id=-5),
        dict(mask_seed=-1),
        dict(mask_seed="0"),
        dict(time_epsilon=1.0),
        dict(time_epsilon=float("nan")),
        dict(load_balance_coef=-1.0),
        dict(z_loss_coef=float("nan")),
        dict(elbo_form=None),
        dict(antithetic="no"),
        dict(eos_tail=None),
        dict(loss_type=3),
    ],
    ids=repr,
)
def test_vrpo_config_rejects_bad_fields_naming_them(tmp_path, overrides):
    ((name, value),) = overrides.items()
    with pytest.raises(ValueError, match=f"^{name}="):
        vrpo_config(tmp_path, **overrides)


def test_trainer_configs_keep_accepting_good_values(tmp_path):
    args = sft_config(tmp_path, mask_token_id=126, random_length_prob=1, time_epsilon=0.01, load_balance_coef=0)
    assert (args.mask_token_id, args.random_length_prob, args.assistant_only_loss) == (126, 1, None)
    args = vrpo_config(tmp_path, beta=2, num_mc_samples=4, num_timesteps=2, mask_seed=3, elbo_form="time")
    assert (args.beta, args.num_mc_samples, args.num_timesteps) == (2, 4, 2)
