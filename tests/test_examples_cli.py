"""examples/generate.py, chat.py and push_to_hub.py in their offline --tiny mode (run in-process with runpy), and the
pushed folder loading with trust_remote_code where this package cannot be imported."""

import io
import json
import os
import runpy
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
from conftest import ROOT

from modeling_llada_moe.apps.inference import END_OF_TURN, decode_completion, encode_prompt, load_model_and_tokenizer
from modeling_llada_moe.apps.tiny_task import save_tiny_folder


def run_example(name: str, *args, monkeypatch, capsys, stdin: str | None = None) -> str:
    """Stdout of `python examples/NAME ARGS` run in this process."""
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    return capsys.readouterr().out


def tiny_answers(tmp_path, turns: list[str]) -> list[str]:
    """The examples' answers computed directly: the same tiny model (seed 0), threshold 0.9 + dual cache."""
    model, tokenizer = load_model_and_tokenizer(save_tiny_folder(tmp_path / "tiny"), device="cpu")
    decoding = dict(max_new_tokens=8, block_length=8, threshold=0.9, cache_implementation="dual", stop_at_eos=True)
    messages, answers = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        input_ids = encode_prompt(tokenizer, messages=messages)
        out = model.diffusion_generate(input_ids, stop_strings=[END_OF_TURN], tokenizer=tokenizer, **decoding)
        answers.append(decode_completion(tokenizer, out[0, input_ids.shape[1] :]))
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def test_generate_and_chat_examples(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the examples pick CUDA when there is one
    first, second = tiny_answers(tmp_path, ["t1 t2 t3 t4", "t5 t6"])

    out = run_example(
        "generate.py", "--tiny", "--max-new-tokens", 8, "--block-length", 8, monkeypatch=monkeypatch, capsys=capsys
    )
    streamed, stats = out.rstrip("\n").split("\n")
    assert streamed.strip() == first and "forward passes" in stats

    chat = ["--tiny", "--max-new-tokens", 8, "--block-length", 8]
    out = run_example("chat.py", *chat, monkeypatch=monkeypatch, capsys=capsys, stdin="t1 t2 t3 t4\nt5 t6\n")
    assert [line.strip() for line in out.rstrip("\n").split("\n")] == [first, second]


REMOTE_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_llada_moe"] = None  # the package is hidden: the folder's own code must do
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, device_map="cpu")
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "t1 t2"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.diffusion_generate(ids, max_new_tokens=8, block_length=4)
    assert out.shape == (1, ids.shape[1] + 8) and not (out == model.config.mask_token_id).any()
    print("remote-code load OK")
    """
)


def test_push_to_hub_example(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))  # no stored login
    folder = tmp_path / "hub"
    args = ["--tiny", "--bits", 4, "--repo", "me/llada-moe-tiny", "--private", "--out", folder]
    out = run_example("push_to_hub.py", *args, monkeypatch=monkeypatch, capsys=capsys)
    assert "nothing was pushed" in out and "hf auth login" in out and "HF_TOKEN" in out
    assert f"hf upload me/llada-moe-tiny {folder} . --private" in out
    files = set(os.listdir(folder))
    assert {"README.md", "config.json", "model.safetensors", "modeling_llada_moe.py", "generation_utils.py"} <= files
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    card = (folder / "README.md").read_text()
    assert "trust_remote_code=True" in card and "| weights | bitsandbytes 4-bit nf4" in card
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["load_in_4bit"]

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and "remote-code load OK" in result.stdout, result.stderr


def test_push_to_hub_example_with_a_token_but_no_reachable_hub(tmp_path, monkeypatch, capsys):
    """With a token the real HfApi is called; a closed local port stands in for an unreachable Hub."""
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(OSError, match=r"could not push .* to me/t at http://127\.0\.0\.1:9"):
        run_example("push_to_hub.py", "--tiny", "--repo", "me/t", "--out", tmp_path / "hub", monkeypatch=monkeypatch,
                    capsys=capsys)
    assert {"README.md", "tokenizer.json", "model.safetensors"} <= set(os.listdir(tmp_path / "hub"))
