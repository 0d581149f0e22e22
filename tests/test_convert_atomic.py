"""`llada-moe convert` writes all or nothing (issue 23, item 1), and an 8-bit convert reloads (item 9).

The whole output (weights, config, code, card, tokenizer, chat template) is staged, verified, then replaces the
destination as a whole: `--overwrite` leaves no file of the earlier folder behind, and a convert that fails while
writing (a real write failure: a file-size limit in a subprocess) leaves the destination exactly as it was."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import run_cli
from transformers import AutoTokenizer

from modeling_llada_moe import LLaDAMoEForMaskedLM
from modeling_llada_moe.apps.tiny_task import LING_CHAT_TEMPLATE, save_tiny_folder, tiny_model
from modeling_llada_moe.atomic_save import BACKUP_PREFIX, STAGING_PREFIX
from quantization import load_quantized


@pytest.fixture(scope="module")
def chat_source(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("chat"), tiny_model(seed=1))


@pytest.fixture(scope="module")
def plain_source(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("plain"), tiny_model(seed=2), chat=False)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def earlier_folder(chat_source: Path, tmp_path: Path, capsys) -> Path:
    """A converted chat model, plus files a user or an earlier sharded save left there."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "convert", chat_source, out, "--no-verify")
    assert code == 0, err
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"an earlier shard")
    (out / "old_adapter").mkdir()
    (out / "old_adapter" / "adapter_config.json").write_text("{}")
    return out


def test_overwrite_replaces_the_whole_folder(chat_source, plain_source, tmp_path, capsys):
    out = earlier_folder(chat_source, tmp_path, capsys)
    assert (out / "chat_template.jinja").exists()
    code, stdout, err = run_cli(capsys, "convert", plain_source, out, "--overwrite")
    assert code == 0 and "logits identical" in stdout, err

    fresh = tmp_path / "fresh"
    assert run_cli(capsys, "convert", plain_source, fresh, "--no-verify")[0] == 0
    # Exactly the files a convert into an empty folder writes, with the same bytes: no chat template of the earlier
    # tokenizer, no stray shard, no notes, no staging or backup folder.
    assert snapshot(out) == snapshot(fresh)
    assert not any(entry.name.startswith((STAGING_PREFIX, BACKUP_PREFIX)) for entry in out.iterdir())
    assert AutoTokenizer.from_pretrained(out).chat_template is None


def test_overwrite_with_a_source_without_tokenizer_drops_the_old_tokenizer(chat_source, tmp_path, capsys):
    out = earlier_folder(chat_source, tmp_path, capsys)
    bare = tmp_path / "bare"
    tiny_model(seed=3).save_pretrained(bare)  # weights and configs, no tokenizer
    code, _, err = run_cli(capsys, "convert", bare, out, "--overwrite", "--no-verify")
    assert code == 0 and "no tokenizer found" in err
    assert not {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "notes.txt"} & set(os.listdir(out))


def test_overwrite_refuses_folders_it_would_wrongly_replace(chat_source, tmp_path, capsys):
    stuff = tmp_path / "stuff"
    stuff.mkdir()
    (stuff / "photo.jpg").write_bytes(b"...")
    code, _, err = run_cli(capsys, "convert", chat_source, stuff, "--overwrite")
    assert code == 2 and "not a model folder" in err and (stuff / "photo.jpg").exists()

    out = earlier_folder(chat_source, tmp_path, capsys)
    inner = save_tiny_folder(out / "inner")
    before = snapshot(out)
    code, _, err = run_cli(capsys, "convert", inner, out, "--overwrite")
    assert code == 2 and "lies inside the destination" in err and snapshot(out) == before


def limited_convert(source: Path, destination: Path, file_size_limit: int, tmp_path: Path):
    """`llada-moe convert SOURCE DESTINATION --overwrite` in a subprocess that cannot write files larger than
    `file_size_limit` bytes (RLIMIT_FSIZE; SIGXFSZ ignored, so the write fails with EFBIG as on a full disk)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "modeling_llada_moe.apps.cli", "convert", str(source), str(destination), "--overwrite"],
        preexec_fn=limit,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_write_failure_leaves_the_destination_as_it_was(chat_source, plain_source, tmp_path, capsys):
    out = earlier_folder(chat_source, tmp_path, capsys)
    before = snapshot(out)
    weights = (plain_source / "model.safetensors").stat().st_size

    # The weights file cannot be written at all.
    result = limited_convert(plain_source, out, weights // 4, tmp_path)
    assert result.returncode == 1 and "File too large" in result.stderr and "Traceback" not in result.stderr
    assert "left as it was" in result.stderr and snapshot(out) == before

    # The weights are written, then the tokenizer fails (its chat template is larger than the limit): the failure
    # falls between two files of the save.
    big = save_tiny_folder(tmp_path / "big_template", tiny_model(seed=4))
    (big / "chat_template.jinja").write_text("{# " + "x" * (2 * weights) + " #}" + LING_CHAT_TEMPLATE)
    result = limited_convert(big, out, weights + weights // 2, tmp_path)
    assert result.returncode == 1 and "File too large" in result.stderr, result.stderr
    assert snapshot(out) == before

    # Into a new folder: nothing is left behind, not even an empty folder.
    result = limited_convert(plain_source, tmp_path / "new", weights // 4, tmp_path)
    assert result.returncode == 1 and not (tmp_path / "new").exists()


def test_8bit_convert_reloads_with_the_same_logits(chat_source, tmp_path, capsys):
    out = tmp_path / "int8"
    code, stdout, err = run_cli(capsys, "convert", chat_source, out, "--bits", 8)
    assert code == 0 and "forward OK" in stdout, err
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"]
        and AutoTokenizer.from_pretrained(out).chat_template == LING_CHAT_TEMPLATE
    )

    reloaded = load_quantized(out, bits=8, device_map="cpu")
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    ids = torch.randint(0, 110, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = reloaded(ids).logits
        direct = load_quantized(chat_source, bits=8, device_map="cpu")(ids).logits
        full = LLaDAMoEForMaskedLM.from_pretrained(chat_source).eval()(ids).logits
    # The saved int8 weights reload bit-exactly: the same logits as quantizing the source in memory.
    assert torch.equal(logits, direct)
    # And they are the source model's, up to int8 + bf16 rounding: measured max |diff| 0.011 on logits of max |x| 0.61
    # (std 0.16); a wrong or shuffled weight moves them by about the std.
    assert (logits.float() - full).abs().max() < 0.04 < full.std()
