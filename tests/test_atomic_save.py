"""Saves are all-or-nothing: a save that fails partway (a full filesystem, a write refused by the kernel, an error
between two files) leaves the folder exactly as it was, and a save never leaves an earlier save's files that a load
would wrongly read."""

import errno
import hashlib
import json
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModel

from modeling_llada_moe import LLaDAMoEForMaskedLM
from modeling_llada_moe.atomic_save import staged_save


def snapshot(folder) -> dict[str, str]:
    """Every entry below `folder` (hidden ones included) with the sha256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(folder.rglob("*"))
    }


def logits(model, seed=0):
    ids = torch.randint(0, 120, (1, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(ids).logits


def test_a_failed_save_between_two_files_leaves_the_folder_as_it_was(tmp_path):
    first = tiny_model(seed=1)
    first.save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    second = tiny_model(seed=2, num_hidden_layers=3, moe_layer_freq=[1, 1, 1])
    # transformers writes config.json, then the generation config, then the weights: a generation config that
    # cannot be written as JSON fails the save after config.json was written.
    second.generation_config.unwritable = object()
    with pytest.raises(TypeError):
        second.save_pretrained(tmp_path)
    assert snapshot(tmp_path) == before
    reloaded = LLaDAMoEForMaskedLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(reloaded), logits(first), rtol=0, atol=0)


WRITER = textwrap.dedent(
    """
    import resource, signal, sys
    from modeling_llada_moe.apps.tiny_task import tiny_model
    folder, limit = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
    model = tiny_model(seed=2, hidden_size=128, num_hidden_layers=3, moe_layer_freq=[1, 1, 1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        model.save_pretrained(folder)
    except Exception as error:  # safetensors reports the OS error in its own exception type
        print(type(error).__name__, error)
    else:
        print("saved")
    """
)


def test_a_write_the_kernel_refuses_partway_leaves_the_folder_as_it_was(tmp_path):
    first = tiny_model(seed=1)
    first.save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    # The bigger model's weights (2.1 MB) pass twice the earlier weight file's size (0.6 MB): the kernel refuses
    # the write once the file reaches the limit, after config.json and the generation config were written.
    limit = 2 * (tmp_path / "model.safetensors").stat().st_size
    result = subprocess.run(
        [sys.executable, "-c", WRITER, str(tmp_path), str(limit)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "saved" not in result.stdout and f"(os error {errno.EFBIG})" in result.stdout, result.stdout
    assert snapshot(tmp_path) == before
    torch.testing.assert_close(logits(LLaDAMoEForMaskedLM.from_pretrained(tmp_path)), logits(first), rtol=0, atol=0)


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 2 MiB tmpfs (root can mount one; elsewhere the test is skipped, and the RLIMIT test above covers it)."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_filesystem_leaves_the_folder_as_it_was(small_filesystem):
    folder = small_filesystem / "model"
    first = tiny_model(seed=1)
    first.save_pretrained(folder)
    before = snapshot(folder)
    bigger = tiny_model(seed=2, hidden_size=128, num_hidden_layers=3, moe_layer_freq=[1, 1, 1])  # 2.4 MB: no room
    with pytest.raises(Exception, match=rf"No space left on device \(os error {errno.ENOSPC}\)"):
        bigger.save_pretrained(folder)
    assert snapshot(folder) == before
    torch.testing.assert_close(logits(AutoModel.from_pretrained(folder)), logits(first), rtol=0, atol=0)
    # A save that fits goes through on the same filesystem afterwards (nothing of the failed one takes room).
    same_size = tiny_model(seed=4)
    same_size.save_pretrained(folder)
    torch.testing.assert_close(logits(AutoModel.from_pretrained(folder)), logits(same_size), rtol=0, atol=0)


def test_a_save_replaces_an_earlier_sharded_save_and_keeps_other_files(tmp_path):
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "tokenizer.json").write_text("{}")  # a file of another save (the tokenizer's): not the model's to drop
    model.save_pretrained(tmp_path)
    names = {path.name for path in tmp_path.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not any(name.startswith("model-") or name.endswith(".index.json") for name in names)
    assert not any(name.startswith(".llada-moe-") for name in names)
    torch.testing.assert_close(logits(LLaDAMoEForMaskedLM.from_pretrained(tmp_path)), logits(model), rtol=0, atol=0)


def test_save_into_a_path_that_is_a_file_names_it(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"not a folder")
    with pytest.raises(ValueError, match=r"weights\.bin.*is an existing file"):
        tiny_model().save_pretrained(target)
    assert target.read_bytes() == b"not a folder"


def test_staged_save_commits_everything_or_nothing(tmp_path):
    (tmp_path / "keep.txt").write_text("old")
    (tmp_path / "stale.bin").write_text("stale")
    with pytest.raises(RuntimeError), staged_save(tmp_path, lambda folder: [folder / "stale.bin"]) as staging:
        (staging / "keep.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert snapshot(tmp_path) == {
        "keep.txt": hashlib.sha256(b"old").hexdigest(), "stale.bin": hashlib.sha256(b"stale").hexdigest()
    }
    with staged_save(tmp_path, lambda folder: [folder / "stale.bin"]) as staging:
        (staging / "keep.txt").write_text("new")
        (staging / "config.json").write_text(json.dumps({}))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "new"


def test_a_trainer_final_save_is_all_or_nothing(tmp_path):
    from datasets import Dataset

    from modeling_llada_moe.apps.tiny_task import reversal_examples, tiny_tokenizer
    from trl_ext import DiffusionSFTConfig, DiffusionSFTTrainer

    args = DiffusionSFTConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", gradient_checkpointing=False, dataloader_num_workers=0, bf16=False,
    )
    trainer = DiffusionSFTTrainer(
        model=tiny_model(), args=args, train_dataset=Dataset.from_list(reversal_examples(8)),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    folder = tmp_path / "final"
    trainer.save_model(str(folder))
    assert {"model.safetensors", "config.json", "tokenizer.json", "training_args.bin"} <= {
        path.name for path in folder.iterdir()
    }
    before = snapshot(folder)
    trainer.train()  # one more step: new weights
    # The tokenizer is written after the model: one that cannot be written as JSON fails the save between files.
    trainer.processing_class.init_kwargs["unwritable"] = object()
    with pytest.raises(TypeError):
        trainer.save_model(str(folder))
    assert snapshot(folder) == before
    del trainer.processing_class.init_kwargs["unwritable"]
    trainer.save_model(str(folder))
    assert snapshot(folder)["model.safetensors"] != before["model.safetensors"]
    assert not any(path.name.startswith(".llada-moe-") for path in folder.iterdir())
