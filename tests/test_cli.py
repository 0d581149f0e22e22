"""The `llada-moe` command line: generate, chat, convert, bench, --help and its errors, on tiny folders.

Most checks call `main([...])` in-process (chat reads a piped conversation from `sys.stdin`); one runs the installed
console script as a subprocess (convert of an official-layout folder), since starting torch + transformers takes
seconds."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import ROOT, run_cli
from official_reference import official_config_dict, official_state_dict, write_official_checkpoint
from transformers import AutoTokenizer

from modeling_llada_moe import LLaDAMoEForMaskedLM
from modeling_llada_moe.apps import cli
from modeling_llada_moe.apps.inference import decode_completion, encode_prompt, load_model_and_tokenizer
from modeling_llada_moe.apps.tiny_task import LING_CHAT_TEMPLATE, save_tiny_folder, tiny_tokenizer


END = "<|role_end|>"
FLAGS = ["--max-new-tokens", "8", "--block-length", "4", "--threshold", "0.3", "--cache", "dual", "--device", "cpu"]
DECODING = dict(max_new_tokens=8, block_length=4, threshold=0.3, cache_implementation="dual", stop_at_eos=True)


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("chat"), max_new_tokens=16, block_length=8)


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("plain"), chat=False, max_new_tokens=16, block_length=8)


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory) -> Path:
    """A tiny checkpoint in the official layout (per-expert keys, model_type "llada", no mask id) with a tokenizer."""
    config = official_config_dict()
    folder = write_official_checkpoint(tmp_path_factory.mktemp("official"), config, official_state_dict(config, seed=3))
    tiny_tokenizer(LING_CHAT_TEMPLATE).save_pretrained(folder)
    return folder


def expected_answer(model, tokenizer, input_ids, **decoding) -> tuple[str, int]:
    """The answer text and NFE of `diffusion_generate` called directly with the CLI's stops."""
    out = model.diffusion_generate(
        input_ids, stop_strings=[END], tokenizer=tokenizer, return_dict_in_generate=True, **decoding
    )
    return decode_completion(tokenizer, out.sequences[0, input_ids.shape[1] :]), int(out.nfe[0])


def script_command() -> list[str]:
    """The installed console script, or the module when the package was installed without scripts."""
    script = Path(sys.executable).with_name("llada-moe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "modeling_llada_moe.apps.cli"]


def run_script(*argv, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*script_command(), *map(str, argv)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_streamed_plain_and_json_match_diffusion_generate(chat_folder, capsys):
    model, tokenizer = load_model_and_tokenizer(chat_folder, device="cpu")
    expected, nfe = expected_answer(model, tokenizer, encode_prompt(tokenizer, "t1 t2 t3"), **DECODING)

    code, streamed, _ = run_cli(capsys, "generate", "--model", chat_folder, "t1 t2 t3", *FLAGS)
    assert code == 0 and streamed.strip() == expected and streamed.endswith("\n")
    code, plain, _ = run_cli(capsys, "generate", "--model", chat_folder, "--prompt", "t1 t2 t3", "--no-stream", *FLAGS)
    assert code == 0 and plain == expected + "\n"
    code, out, _ = run_cli(capsys, "generate", "--model", chat_folder, "t1 t2 t3", "--json", *FLAGS)
    result = json.loads(out)
    assert code == 0 and result["text"] == expected and result["nfe"] == nfe and result["seconds"] > 0
    assert result["prompt_tokens"] == 10 and 0 < result["tokens_per_forward"] <= 8

    messages = [
        {"role": "user", "content": "t4 t5"},
        {"role": "assistant", "content": "t6"},
        {"role": "user", "content": "t7"},
    ]
    ids = encode_prompt(tokenizer, messages=messages, system="t9")
    chat_expected, _ = expected_answer(model, tokenizer, ids, **DECODING)
    code, out, _ = run_cli(
        capsys, "generate", "--model", chat_folder, "--messages", json.dumps(messages), "--system", "t9", *FLAGS
    )
    assert code == 0 and out.strip() == chat_expected

    # Defaults from the folder's generation_config.json (16 tokens in blocks of 8), no chat template, sampling.
    raw_ids = tokenizer("t1 t2", return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(3)
    sampled, _ = expected_answer(
        model, tokenizer, raw_ids, temperature=0.7, top_k=20, stop_at_eos=True, generator=generator
    )
    argv = ["generate", "--model", chat_folder, "--no-chat-template", "t1 t2", "--temperature", "0.7", "--top-k", "20"]
    code, out, _ = run_cli(capsys, *argv, "--seed", "3", "--device", "cpu", "--no-stream")
    assert code == 0 and out.strip() == sampled


def test_streamer_stops_printing_at_the_end_of_the_turn(capsys):
    tokenizer = tiny_tokenizer(LING_CHAT_TEMPLATE)
    streamer = cli.AnswerStreamer(tokenizer)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt: not printed
    streamer.put(torch.tensor([[4, 5, tokenizer.convert_tokens_to_ids(END), 6]]))
    streamer.put(torch.tensor([[7, 8]]))
    streamer.end()
    assert capsys.readouterr().out == "t4 t5\n"


def test_generate_8bit_on_cpu(chat_folder, capsys):
    import bitsandbytes  # noqa: F401  (a dev dependency: missing, the test fails)
    model, tokenizer = load_model_and_tokenizer(chat_folder, bits=8, device="cpu")
    expected, _ = expected_answer(model, tokenizer, encode_prompt(tokenizer, "t3 t4"), **DECODING)
    code, out, _ = run_cli(capsys, "generate", "--model", chat_folder, "--bits", "8", "t3 t4", "--no-stream", *FLAGS)
    assert code == 0 and out == expected + "\n"


def test_chat_keeps_history_across_piped_turns(chat_folder, capsys, monkeypatch):
    lines = "t1 t2\n/system t5\nt3 t4\n/bogus\n/system\n/reset\n\nt1 t2\n/exit\nt9\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code, out, err = run_cli(capsys, "chat", "--model", chat_folder, *FLAGS[:4], "--device", "cpu")
    assert code == 0, err
    assert "unknown command '/bogus'" in err and "(conversation cleared)" in err

    model, tokenizer = load_model_and_tokenizer(chat_folder, device="cpu")
    decoding = dict(max_new_tokens=8, block_length=4, stop_at_eos=True)
    first = [{"role": "user", "content": "t1 t2"}]
    answer1, _ = expected_answer(model, tokenizer, encode_prompt(tokenizer, messages=first), **decoding)
    second = [*first, {"role": "assistant", "content": answer1}, {"role": "user", "content": "t3 t4"}]
    answer2, _ = expected_answer(model, tokenizer, encode_prompt(tokenizer, messages=second, system="t5"), **decoding)
    # After /system (removed) and /reset the same first question gets the same answer; "t9" after /exit is not read.
    assert out.split("\n") == [answer1, answer2, answer1, ""]


def test_convert_official_layout_script_reloads_with_remote_code(official_folder, tmp_path):
    out = tmp_path / "converted"
    result = run_script("convert", official_folder, out, "--mask-token-id", "126", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "logits identical to the source model" in result.stdout and "with tokenizer" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llada_moe" and config["mask_token_id"] == 126
    assert config["auto_map"]["AutoModel"] == "modeling_llada_moe.LLaDAMoEForMaskedLM"
    assert {"README.md", "modeling_llada_moe.py", "tokenizer.json", "chat_template.jinja"} <= set(os.listdir(out))

    source = LLaDAMoEForMaskedLM.from_pretrained(official_folder, mask_token_id=126)
    converted = LLaDAMoEForMaskedLM.from_pretrained(out)
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(source(ids).logits, converted(ids).logits)
    assert AutoTokenizer.from_pretrained(out).chat_template == LING_CHAT_TEMPLATE


def test_convert_official_checkpoint_then_push_to_an_unreachable_hub(official_small, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, "convert", official_small, tmp_path / "a")
    assert code == 2 and "mask_token_id=156895" in err and "--mask-token-id" in err

    # A token but no reachable Hub (a closed local port): the real HfApi fails, the folder stays saved, exit code 1.
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    argv = ["convert", official_small, tmp_path / "b", "--mask-token-id", 301, "--no-verify", "--push-to-hub", "me/m"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and "no tokenizer found" in err and "could not push" in err and "http://127.0.0.1:9" in err
    assert f"hf upload me/m {tmp_path / 'b'} ." in err and (tmp_path / "b" / "model.safetensors").exists()

    expected = torch.load(official_small / "expected.pt", weights_only=True)
    with torch.no_grad():
        logits = LLaDAMoEForMaskedLM.from_pretrained(tmp_path / "b").eval()(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-4, rtol=0)  # the official code's own logits


def test_convert_4bit_without_a_token_explains_how_to_push(official_folder, tmp_path, capsys, monkeypatch):
    import bitsandbytes as bnb
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))  # no stored login
    out = tmp_path / "nf4"
    argv = ["convert", official_folder, out, "--bits", 4, "--mask-token-id", 126, "--push-to-hub", "me/tiny-nf4"]
    code, stdout, err = run_cli(capsys, *argv, "--private")
    assert code == 0, err
    assert "trust_remote_code=True): forward OK" in stdout and "nothing was pushed" in stdout
    assert "hf auth login" in stdout and "HF_TOKEN" in stdout and f"hf upload me/tiny-nf4 {out} . --private" in stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    from quantization import load_quantized

    model = load_quantized(out, bits=4, device_map="cpu")
    assert isinstance(model.model.layers[0].mlp.experts.gate_up, bnb.nn.Linear4bit)


def test_bench_runs_the_repository_benchmark(capsys, tmp_path, monkeypatch):
    argv = ["bench", "generation", "--", "--train-steps", "5", "--batch", "2", "--repeats", "1"]
    code, out, _ = run_cli(capsys, *argv)
    table = [line for line in out.splitlines() if "|" in line]
    assert code == 0 and len(table) == 5 and "dual cache + threshold 0.9" in out
    code, _, err = run_cli(capsys, "bench", "generation", "--bogus")
    assert code == 2 and "--bogus" in err
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="clone the llada-moe repository"):
        cli.find_benchmarks(package_root=tmp_path)
    assert cli.find_benchmarks() == ROOT


@pytest.mark.parametrize(
    "command, words",
    [
        ([], ["generate", "chat", "serve", "convert", "bench"]),
        (["generate"], ["--messages", "--threshold", "--cache", "--no-stream", "--json", "--bits", "--seed"]),
        (["chat"], ["/reset", "/system", "/exit", "--system", "--remasking"]),
        (["convert"], ["--bits", "--push-to-hub", "--mask-token-id", "trust_remote_code"]),
        (["serve"], ["--max-batch-size", "--batch-window-ms", "--api-key", "--preset", "/v1/chat/completions",
                     "--threshold", "--seed"]),
        (["bench"], ["generation", "forward", "moe", "serve", "-- --repeats 3"]),
    ],
)
def test_help(capsys, command, words):
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0 and all(word in out for word in words), out


def test_no_command_prints_usage(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2 and "COMMAND" in err


def test_bad_input_exits_2_naming_the_value(chat_folder, plain_folder, tmp_path, capsys):
    model = ["--model", chat_folder]
    cases = [
        (["generate", *model, "--bits", "3", "x"], "invalid choice: 3"),
        (["generate", *model, "--dtype", "int4", "x"], "invalid choice: 'int4'"),
        (["generate", "--model", tmp_path / "missing", "x"], "no such folder"),
        (["generate", *model, "--steps", "1", "x"], "--steps=1 is invalid; expected a positive integer, at least"),
        (["generate", *model, "--top-k", "5", "x"], "--top-k=5 is invalid"),
        (["generate", *model, "--threshold", "0.5", "--factor", "1", "x"], "exclusive"),
        (["generate", *model, "--temperature", "-1", "x"], "'-1' is not a number >= 0"),
        (["generate", *model, "--max-new-tokens", "0", "x"], "'0' is not a positive integer"),
        (["generate", *model, "--cache", "full", "x"], "invalid choice: 'full'"),
        (["generate", *model, "--remasking", "best", "x"], "invalid choice: 'best'"),
        (["generate", *model, "--device", "tpu", "x"], "'tpu'"),
        (["generate", *model, "x", "--prompt", "y"], "give the prompt once"),
        (["generate", *model, "--messages", '[{"role": "bot", "content": "t1"}]'], "'bot'"),
        (["generate", *model, "--messages", "turns.json"], "'turns.json': no such file"),
        (["generate", *model, "--messages", "[{"], "invalid JSON"),
        (["generate", *model, "--no-chat-template", "--system", "t1", "x"], "--system needs the chat template"),
        (["generate", "--model", plain_folder, "--messages", '[{"role": "user", "content": "t1"}]'], "chat template"),
        (["chat", "--model", plain_folder], "chat needs a tokenizer with a chat template"),
        (["convert", chat_folder, plain_folder], "is not an empty folder"),
        (["convert", chat_folder, tmp_path / "x", "--push-to-hub", "bad name!"], "--push-to-hub 'bad name!'"),
        (["convert", chat_folder, tmp_path / "y", "--bits", "3"], "invalid choice: 3"),
        (["bench", "speed"], "invalid choice: 'speed'"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
        assert "Traceback" not in err and not out
    assert not (tmp_path / "x").exists()
