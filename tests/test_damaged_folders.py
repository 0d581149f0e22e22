"""Damaged model folders through the Python API, weights that do not fit an edited config.json, and chat templates
that cannot render (issue 23, items 6 and 7).

The Python API (`LLaDAMoEForMaskedLM.from_pretrained`, `LLaDAMoEConfig.from_pretrained`, `AutoModel` with remote
code) names the damaged file in a `ValueError` / `TypeError`; the command line also refuses weights that are missing
or unexpected for the config (transformers only warns), and a chat template that does not render (exit 2)."""

import io
import json
import shutil
import socket
import struct
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from time_limit import time_limit
from transformers import AutoModel

from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM
from modeling_llada_moe.apps.inference import encode_prompt, load_model_and_tokenizer
from modeling_llada_moe.apps.tiny_task import save_tiny_folder, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("tiny"), max_new_tokens=4, block_length=4)


def damaged(folder: Path, tmp_path: Path, file: str, content: bytes | str) -> Path:
    copy = shutil.copytree(folder, tmp_path / "damaged")
    (copy / file).write_bytes(content.encode() if isinstance(content, str) else content)
    return copy


def edited_config(folder: Path, tmp_path: Path, **changes) -> Path:
    copy = shutil.copytree(folder, tmp_path / "edited")
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


LOADERS = {
    "LLaDAMoEForMaskedLM": lambda path: LLaDAMoEForMaskedLM.from_pretrained(path),
    "AutoModel remote code": lambda path: AutoModel.from_pretrained(path, trust_remote_code=True),
}


# ---------------------------------------------------------------------------------------------------------------------
# Example-based: each damage named by its file
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, words",
    [
        ("[1, 2]", "expected a JSON object of settings, got list"),
        ("null", "got NoneType"),
        ('"llada_moe"', "got str"),
        ("7", "got int"),
        ("{", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
)
def test_config_json_that_is_not_an_object_names_the_file(folder, tmp_path, content, words):
    bad = damaged(folder, tmp_path, "config.json", content)
    for load in (LLaDAMoEConfig.from_pretrained, LLaDAMoEForMaskedLM.from_pretrained):
        with pytest.raises(ValueError, match="corrupt model config") as caught:
            load(bad)
        assert str(bad / "config.json") in str(caught.value) and words in str(caught.value)


def test_a_refused_config_value_names_the_file_and_the_field(folder, tmp_path):
    bad = edited_config(folder, tmp_path, hidden_size=-8)
    with pytest.raises(ValueError, match="`hidden_size`=-8 is invalid") as caught:
        LLaDAMoEForMaskedLM.from_pretrained(bad)
    assert str(bad / "config.json") in str(caught.value)
    config = json.loads((folder / "config.json").read_text())
    bad.joinpath("config.json").write_text(json.dumps({**config, "vocab_size": "x"}))
    with pytest.raises(TypeError, match="`vocab_size`='x' has the wrong type") as caught:
        LLaDAMoEConfig.from_pretrained(bad)
    assert str(bad / "config.json") in str(caught.value)


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize(
    "content, words",
    [("[1, 2]", "got list"), ("null", "got NoneType"), ('"dual"', "got str"), ("{", "not valid JSON")],
)
def test_generation_config_that_is_not_an_object_names_the_file(folder, tmp_path, loader, content, words):
    bad = damaged(folder, tmp_path, "generation_config.json", content)
    with pytest.raises(ValueError, match="corrupt generation config") as caught:
        LOADERS[loader](bad)
    assert str(bad / "generation_config.json") in str(caught.value) and words in str(caught.value)


@pytest.mark.parametrize(
    "settings_, error, words",
    [({"block_length": -3}, ValueError, "`block_length`=-3"), ({"max_new_tokens": "x"}, TypeError, "`max_new_tokens`")],
)
def test_a_refused_generation_setting_names_the_file_and_the_field(folder, tmp_path, settings_, error, words):
    bad = damaged(folder, tmp_path, "generation_config.json", json.dumps(settings_))
    with pytest.raises(error, match=words) as caught:
        LLaDAMoEForMaskedLM.from_pretrained(bad)
    assert str(bad / "generation_config.json") in str(caught.value)


def cut(keep: float):
    def damage(data: bytes) -> bytes:
        return data[: int(len(data) * keep)]

    return damage


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize(
    "damage, words",
    [
        (cut(0.0), "header too small"),
        (cut(0.5), "not fully covered"),
        (cut(0.99), "not fully covered"),
        (lambda data: data[:20], "invalid header length"),
        (lambda data: data[:8] + b"[" + data[9:], "header"),
    ],
)
def test_damaged_safetensors_names_the_file(folder, tmp_path, loader, damage, words):
    bad = damaged(folder, tmp_path, "model.safetensors", damage((folder / "model.safetensors").read_bytes()))
    with pytest.raises(ValueError, match="corrupt weights file") as caught:
        LOADERS[loader](bad)
    assert str(bad / "model.safetensors") in str(caught.value) and words in str(caught.value)


def test_sharded_checkpoint_with_a_missing_or_cut_shard_names_it(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (tmp_path / "sharded" / shards[-1]).write_bytes((tmp_path / "sharded" / shards[-1]).read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt weights file") as caught:
        LLaDAMoEForMaskedLM.from_pretrained(tmp_path / "sharded")
    assert shards[-1] in str(caught.value)
    (tmp_path / "sharded" / shards[-1]).unlink()
    with pytest.raises(ValueError, match="the weights file is missing") as caught:
        LLaDAMoEForMaskedLM.from_pretrained(tmp_path / "sharded")
    assert shards[-1] in str(caught.value)
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match="corrupt weights index"):
        LLaDAMoEForMaskedLM.from_pretrained(tmp_path / "sharded")


def test_config_sizes_that_do_not_fit_the_weights_name_config_json(folder, tmp_path):
    bad = edited_config(folder, tmp_path, vocab_size=136)
    with pytest.raises(ValueError, match="does not match") as caught:
        LLaDAMoEForMaskedLM.from_pretrained(bad)
    assert str(bad / "config.json") in str(caught.value) and str(bad / "model.safetensors") in str(caught.value)


def test_weights_whose_experts_cannot_be_merged_name_the_files(folder, tmp_path):
    """A tensor renamed in the safetensors header (one expert's `up_proj` of layer 1 no longer named so): transformers'
    expert conversion then has 8 gates and 7 ups to merge and fails with a RuntimeError; it is a ValueError naming
    config.json and the weights file."""
    data = (folder / "model.safetensors").read_bytes()
    end = safetensors_header_length(data)
    name = b"model.layers.1.mlp.experts.7.up_proj.weight"
    assert data[:end].count(name) == 1
    bad = damaged(folder, tmp_path, "model.safetensors", data.replace(name, name.replace(b"up_proj", b"up_proX"), 1))
    with pytest.raises(ValueError, match="does not match") as caught:
        LLaDAMoEForMaskedLM.from_pretrained(bad)
    assert str(bad / "config.json") in str(caught.value) and str(bad / "model.safetensors") in str(caught.value)


def test_intact_folder_still_loads_identically(folder):
    """The checks read headers only and change nothing: the same logits as the saved model's own reload."""
    ids = torch.randint(0, 120, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_model()(ids).logits
        assert torch.equal(LLaDAMoEForMaskedLM.from_pretrained(folder).eval()(ids).logits, expected)


# ---------------------------------------------------------------------------------------------------------------------
# A config.json edited so it no longer matches the weights: the Python API warns (transformers' convention), the
# command line and convert refuse it.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, kind", [(3, "missing from the checkpoint"), (1, "would be dropped")])
def test_layer_added_or_removed_in_config_json_is_refused_by_the_cli(folder, tmp_path, capsys, layers, kind):
    bad = edited_config(folder, tmp_path, num_hidden_layers=layers, moe_layer_freq=None)
    # The Python API loads it (transformers warns): layer 2 randomly initialised, or layer 1 dropped.
    model, info = LLaDAMoEForMaskedLM.from_pretrained(bad, output_loading_info=True)
    assert len(model.model.layers) == layers and (info["missing_keys"] or info["unexpected_keys"])

    code, _, err = run_cli(capsys, "generate", "--model", bad, "t1 t2", "--device", "cpu", "--json")
    assert code == 2 and kind in err and f"model.layers.{min(layers, 2)}." in err and "config.json" in err
    code, _, err = run_cli(capsys, "convert", bad, tmp_path / "out")
    assert code == 2 and kind in err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=kind):
        load_model_and_tokenizer(bad, device="cpu")


def test_8bit_load_refuses_missing_weights_too(folder, tmp_path):
    bad = edited_config(folder, tmp_path, num_hidden_layers=3, moe_layer_freq=None)
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        load_model_and_tokenizer(bad, bits=8, device="cpu")


# ---------------------------------------------------------------------------------------------------------------------
# Chat templates that cannot render: exit 2 naming the template, in every command that renders one
# ---------------------------------------------------------------------------------------------------------------------

BROKEN_TEMPLATES = {
    "syntax error": ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
    "raise_exception": ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    "error inside": ("{{ messages[0]['content'] / 0 }}", "TypeError"),
}


@pytest.fixture(params=sorted(BROKEN_TEMPLATES))
def broken_template(request, folder, tmp_path) -> tuple[Path, str]:
    template, words = BROKEN_TEMPLATES[request.param]
    return damaged(folder, tmp_path, "chat_template.jinja", template), words


def test_generate_with_a_broken_template_exits_2_naming_it(broken_template, capsys):
    bad, words = broken_template
    argv = ["generate", "--model", bad, "t1 t2", "--device", "cpu", "--json"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and str(bad / "chat_template.jinja") in err and words in err and "Traceback" not in err
    code, out, err = run_cli(capsys, *argv, "--no-chat-template")
    assert code == 0 and json.loads(out)["nfe"] >= 1, err  # the plain prompt never touches the template


def test_chat_with_a_broken_template_exits_2_at_start_up(broken_template, capsys, monkeypatch):
    bad, words = broken_template
    monkeypatch.setattr(sys, "stdin", io.StringIO("t1 t2\n"))
    code, out, err = run_cli(capsys, "chat", "--model", bad, "--device", "cpu", "--no-stream")
    assert code == 2 and str(bad / "chat_template.jinja") in err and words in err and out == ""


def test_convert_refuses_a_broken_template(broken_template, capsys, tmp_path):
    bad, words = broken_template
    code, _, err = run_cli(capsys, "convert", bad, tmp_path / "out", "--no-verify")
    assert code == 2 and str(bad / "chat_template.jinja") in err and words in err
    assert not (tmp_path / "out").exists()


def test_serve_refuses_a_broken_template_at_start_up(broken_template, capsys):
    bad, words = broken_template
    with socket.socket() as probe:  # a free port: the server must refuse before it ever serves on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, out, err = run_cli(capsys, "serve", bad, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port))
    assert code == 2 and str(bad / "chat_template.jinja") in err and words in err and "Traceback" not in err


def test_chat_keeps_going_when_the_template_refuses_one_turn(folder, tmp_path, capsys, monkeypatch):
    """A template that refuses system turns only: /system then a question is an error for that turn, the
    conversation goes on once the system prompt is dropped."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "<role>HUMAN</role>{{ m['content'] }}<|role_end|>{% endfor %}<role>ASSISTANT</role>"
    )
    bad = damaged(folder, tmp_path, "chat_template.jinja", template)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/system be brief\nt1 t2\n/system\nt1 t2\n"))
    code, out, err = run_cli(capsys, "chat", "--model", bad, "--device", "cpu", "--no-stream")
    assert code == 0 and "no system turns" in err and str(bad / "chat_template.jinja") in err
    assert len(out.splitlines()) == 1  # one answer: the second question


def test_encode_prompt_names_a_broken_template():
    tokenizer = tiny_tokenizer("{{ raise_exception('nope') }}")
    with pytest.raises(ValueError, match="chat template .* does not render .*nope"):
        encode_prompt(tokenizer, "t1")
    assert encode_prompt(tokenizer, "t1", chat_template=False).tolist() == [[1]]


# ---------------------------------------------------------------------------------------------------------------------
# Property: random byte damage to config.json, generation_config.json or a safetensors header either loads or is a
# ValueError / TypeError naming the file; never another exception. Fixed budget, a time limit per case.
# ---------------------------------------------------------------------------------------------------------------------


def safetensors_header_length(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


DAMAGE = st.tuples(
    st.sampled_from(["replace", "insert", "delete", "truncate"]),
    st.floats(0, 1, exclude_max=True),
    st.binary(min_size=1, max_size=3),
)


def apply_damage(data: bytes, limit: int, damage) -> bytes:
    kind, where, extra = damage
    at = int(where * limit)
    if kind == "replace":
        return data[:at] + extra + data[at + len(extra) :]
    if kind == "insert":
        return data[:at] + extra + data[at:]
    if kind == "delete":
        return data[:at] + data[at + len(extra) :]
    return data[:at]


@pytest.mark.parametrize("file", ["config.json", "generation_config.json", "model.safetensors"])
def test_random_damage_loads_or_names_the_file(folder, tmp_path, file):
    work = shutil.copytree(folder, tmp_path / "fuzz")
    original = (folder / file).read_bytes()
    limit = safetensors_header_length(original) if file.endswith(".safetensors") else len(original)
    outcomes = []

    @settings(
        max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(damage=DAMAGE)
    def load_damaged(damage):
        (work / file).write_bytes(apply_damage(original, limit, damage))
        try:
            with time_limit(30):
                LLaDAMoEForMaskedLM.from_pretrained(work)
        except (ValueError, TypeError) as err:
            assert str(work / file) in str(err), f"{damage}: the error does not name {file}: {err}"
            outcomes.append("error")
        else:
            outcomes.append("loaded")

    load_damaged()
    assert len(outcomes) == 30 and "error" in outcomes  # the damage was not all harmless: the checks were reached
