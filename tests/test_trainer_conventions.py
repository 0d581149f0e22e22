"""TRL / transformers Trainer conventions of DiffusionSFTTrainer and VRPOTrainer: gradient accumulation equals one big
batch, resume is bit-exact with every option, conversational SFT trains the assistant turns only, metrics are
gathered, model cards are tagged; and the example scripts honour TRL's script flags.

Tiny models on one thread; every run is one to four optimizer steps.
"""

import json
import runpy
import sys

import huggingface_hub
import pytest
import torch
from conftest import ONE_SGD_STEP, QUICK_TRAINING, ROOT, tiny_model, tiny_tokenizer
from datasets import Dataset
from test_vrpo import ROWS, preference_dataset, vrpo_config
from test_vrpo import tiny_tokenizer as word_tokenizer

from modeling_llada_moe.apps.tiny_task import LING_CHAT_TEMPLATE, reversal_examples, save_tiny_folder
from trl_ext import DiffusionSFTConfig, DiffusionSFTTrainer, VRPOTrainer


MASK = 126


pytestmark = pytest.mark.usefixtures("one_thread")


def sft_config(output_dir, **overrides) -> DiffusionSFTConfig:
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        **ONE_SGD_STEP,
        logging_steps=1,
        **QUICK_TRAINING,
    )
    return DiffusionSFTConfig(**{**settings, **overrides})


def uneven_rows(count: int) -> list[dict[str, str]]:
    """Prompt-completion rows of different lengths (2..5 digits): micro-batches pad to different widths."""
    return [reversal_examples(1, seed=row, k=2 + row % 4)[0] for row in range(count)]


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_params(a: dict, b: dict, exact: bool = False):
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def sft_step(output_dir, data, batch_size, accumulation, tokenizer=None, **overrides):
    model = tiny_model(seed=1)
    trainer = DiffusionSFTTrainer(
        model=model,
        args=sft_config(
            output_dir, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, **overrides
        ),
        train_dataset=data,
        processing_class=tokenizer or tiny_tokenizer(),
    )
    trainer.train()
    return trainer, params(model)


# --- item 4: gradient accumulation of 2 x batch 2 == batch 4 ------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "big", "small", "overrides"),
    [
        (4, 4, 2, dict(loss_normalization="answer_length")),
        (4, 4, 2, dict(loss_normalization="supervised_tokens")),
        (4, 4, 2, dict(loss_normalization="batch", stratified_t=True)),
        (4, 4, 2, dict(loss_normalization="all_tokens", random_length_prob=1.0)),
        (3, 3, 2, dict(loss_normalization="answer_length")),  # micro-batches of 2 and 1 rows
        (3, 3, 2, dict(loss_normalization="supervised_tokens", random_length_prob=1.0)),
    ],
)
def test_sft_gradient_accumulation_equals_one_batch(tmp_path, rows, big, small, overrides):
    """Every normalisation is over the optimizer step: per answer length then over the step's rows, over its
    supervised / attended tokens, or over its rows; the EOS tails pad to the step's longest row; the crop and the
    masks are drawn per step and row position. So k micro-batches update exactly like one batch of the same rows."""
    data = Dataset.from_list(uneven_rows(rows))
    overrides = dict(load_balance_coef=0.0, z_loss_coef=0.0, **overrides)  # router losses are per micro-batch
    one, one_params = sft_step(tmp_path / "one", data, big, 1, **overrides)
    accumulated, accumulated_params = sft_step(tmp_path / "acc", data, small, 2, **overrides)
    assert one.state.log_history[0]["loss"] == pytest.approx(accumulated.state.log_history[0]["loss"], rel=1e-5)
    initial = params(tiny_model(seed=1))
    assert max((one_params[k] - initial[k]).abs().max().item() for k in initial) > 1e-4  # the step moved the model
    assert_same_params(one_params, accumulated_params)


def test_vrpo_gradient_accumulation_with_a_short_last_micro_batch(tmp_path):
    """3 pairs as one batch vs micro-batches of 2 + 1: the loss is Σ pairs / the step's pairs, not a mean of means."""
    results = []
    for batch_size, steps in ((3, 1), (2, 2)):
        policy = tiny_model(seed=1)
        trainer = VRPOTrainer(
            policy,
            ref_model=tiny_model(seed=2),
            args=vrpo_config(
                tmp_path / str(batch_size),
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=steps,
                **ONE_SGD_STEP,
            ),
            train_dataset=preference_dataset(ROWS[:3]),
            processing_class=word_tokenizer(),
        )
        trainer.train()
        results.append((trainer.state.log_history[0]["loss"], params(policy)))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert_same_params(params_a, params_b)


# --- item 6: resume is bit-exact with every option ----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(random_length_prob=1.0),
        dict(random_length_prob=0.5, stratified_t=True, gradient_accumulation_steps=2, per_device_train_batch_size=2),
    ],
)
def test_sft_resume_is_bit_exact(tmp_path, overrides):
    def run(output_dir, max_steps, resume=None):
        model = tiny_model(seed=1)
        trainer = DiffusionSFTTrainer(
            model=model,
            args=sft_config(
                output_dir,
                max_steps=max_steps,
                optim="adamw_torch",
                learning_rate=1e-2,
                save_strategy="steps",
                save_steps=2,
                **overrides,
            ),
            train_dataset=Dataset.from_list(uneven_rows(12)),
            processing_class=tiny_tokenizer(),
        )
        trainer.train(resume_from_checkpoint=resume)
        return params(model)

    straight = run(tmp_path / "straight", 4)
    resumed = run(tmp_path / "resumed", 4, resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert_same_params(straight, resumed, exact=True)


# --- item 5: conversational SFT trains the assistant turns only ---------------------------------------------------

SYSTEM = {"role": "system", "content": "t9 t9"}


def conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [SYSTEM, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def chat_rows():
    return [(row["prompt"], row["completion"].strip()) for row in uneven_rows(4)]


def test_conversations_train_assistant_turns_only_like_prompt_completion_data(tmp_path):
    """The tokenizer's own Ling template (no {% generation %} markers) and the default config: only the assistant
    content and its <|role_end|> are supervised; the step equals the one on prompt-completion data of the same turns."""
    tokenizer = tiny_tokenizer(LING_CHAT_TEMPLATE)
    messages = Dataset.from_list([{"messages": conversation(p, a)} for p, a in chat_rows()])
    pairs = Dataset.from_list(
        [{"prompt": conversation(p, a)[:2], "completion": conversation(p, a)[2:]} for p, a in chat_rows()]
    )
    chat, chat_params = sft_step(tmp_path / "chat", messages, 4, 1, tokenizer=tokenizer)
    pair, pair_params = sft_step(tmp_path / "pair", pairs, 4, 1, tokenizer=tokenizer)
    assert tokenizer.chat_template == LING_CHAT_TEMPLATE  # the tokenizer keeps (and saves) its own template

    role_end = tokenizer.convert_tokens_to_ids("<|role_end|>")
    for row, (_, answer) in zip(chat.train_dataset, chat_rows()):
        answer_ids = tokenizer(answer).input_ids + [role_end]
        assert row["labels"] == [-100] * (len(row["input_ids"]) - len(answer_ids)) + answer_ids
    assert chat.train_dataset["input_ids"] == pair.train_dataset["input_ids"]
    assert chat.train_dataset["labels"] == pair.train_dataset["labels"]
    assert chat.state.log_history[0]["loss"] == pair.state.log_history[0]["loss"]
    assert_same_params(chat_params, pair_params, exact=True)


def test_prompt_turns_are_never_masked_or_scored(tmp_path):
    tokenizer = tiny_tokenizer(LING_CHAT_TEMPLATE)
    turns = [
        SYSTEM,
        {"role": "user", "content": "t1 t2"},
        {"role": "assistant", "content": "t2 t1"},
        {"role": "user", "content": "t3 t4 t5"},
        {"role": "assistant", "content": "t5 t4 t3"},
    ]
    data = Dataset.from_list([{"messages": turns}, {"messages": conversation("t7", "t7")}])
    trainer = DiffusionSFTTrainer(
        model=tiny_model(), args=sft_config(tmp_path), train_dataset=data, processing_class=tokenizer
    )
    role_end = tokenizer.convert_tokens_to_ids("<|role_end|>")
    multi_turn = trainer.train_dataset[0]
    supervised = [token for token, label in zip(multi_turn["input_ids"], multi_turn["labels"]) if label != -100]
    assert supervised == [2, 1, role_end, 5, 4, 3, role_end]  # both assistant turns, no header, no user / system

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    prompt = batch["labels"] == -100
    seen = []
    handle = trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"].clone(), kwargs["logits_to_keep"].clone())),
        with_kwargs=True,
    )
    trainer.model.train()
    for step in range(20):
        trainer.state.global_step = step
        trainer.compute_loss(trainer.model, dict(batch))
    handle.remove()
    for noisy, scored in seen:
        assert torch.equal(noisy[prompt], batch["input_ids"][prompt])  # never masked
        assert not scored[prompt].any()  # never scored
    assert any(scored.any() for _, scored in seen)


def test_conversations_without_assistant_spans_are_refused(tmp_path):
    data = Dataset.from_list([{"messages": conversation("t1", "t1")}] * 2)
    plain = tiny_tokenizer(LING_CHAT_TEMPLATE)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    with pytest.raises(ValueError, match="generation"):
        DiffusionSFTTrainer(model=tiny_model(), args=sft_config(tmp_path), train_dataset=data, processing_class=plain)
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        DiffusionSFTTrainer(model=tiny_model(), args=sft_config(tmp_path), train_dataset=data, processing_class=plain)


# --- metrics and model cards --------------------------------------------------------------------------------------


def test_sft_metrics_are_gathered_over_processes(tmp_path):
    trainer = DiffusionSFTTrainer(
        model=tiny_model(),
        args=sft_config(tmp_path, max_steps=2),
        train_dataset=Dataset.from_list(uneven_rows(8)),
        processing_class=tiny_tokenizer(),
    )
    gather = trainer.accelerator.gather_for_metrics
    gathered = []
    trainer.accelerator.gather_for_metrics = lambda value, **kwargs: gathered.append(value) or gather(value, **kwargs)
    trainer.train()
    # masked count, correct, nll sum, supervised count, 2 router losses and the token count, for each step
    assert len(gathered) >= 2 * 7
    logged = trainer.state.log_history[0]
    assert 0 <= logged["diffusion/masked_accuracy"] <= 1 and logged["num_tokens"] > 0


def test_model_cards_carry_the_tags(tmp_path):
    sft = DiffusionSFTTrainer(
        model=tiny_model(),
        args=sft_config(tmp_path / "sft"),
        train_dataset=Dataset.from_list(uneven_rows(4)),
        processing_class=tiny_tokenizer(),
    )
    vrpo = VRPOTrainer(
        tiny_model(seed=1),
        ref_model=tiny_model(seed=1),
        args=vrpo_config(tmp_path / "vrpo"),
        train_dataset=preference_dataset(ROWS),
        processing_class=word_tokenizer(),
    )
    for trainer, kind in ((sft, "sft"), (vrpo, "vrpo")):
        assert {"trl", kind, "diffusion", "llada", "llada-moe"} <= set(trainer.model.model_tags)
        trainer.create_model_card(model_name="tiny")
        card = (tmp_path / kind / "README.md").read_text()
        for tag in ("trl", kind, "diffusion", "llada", "llada-moe"):
            assert f"- {tag}\n" in card, (kind, tag)


# --- item 8: the example scripts honour TRL's script flags ---------------------------------------------------------

SFT_DEMO = ["--report_to", "none", "--use_cpu", "--bf16", "false", "--save_strategy", "no", "--disable_tqdm", "true"]


def run_example(name: str, *args, monkeypatch, capsys) -> str:
    """Stdout of `python examples/NAME ARGS` run in this process."""
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    capsys.readouterr()
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    return capsys.readouterr().out


def refused(name: str, *args, monkeypatch, capsys) -> str:
    """The usage error (exit status 2) of an example run with ARGS."""
    with pytest.raises(SystemExit) as exit_info:
        run_example(name, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def hub_folders(tmp_path):
    """A tiny model folder and dataset folders with train / test splits: prompt-completion (SFT) and preference
    (VRPO) jsonl."""
    model = save_tiny_folder(tmp_path / "model")
    pairs = {"prompt": ["t1 t2", "t3 t4"], "chosen": [" t1", " t3"], "rejected": [" t2", " t4"]}
    folders = {"sft.py": tmp_path / "sft", "vrpo.py": tmp_path / "vrpo"}
    for script, folder in folders.items():
        folder.mkdir()
        for split, seed in (("train", 0), ("test", 1)):
            rows = reversal_examples(8, seed=seed) if script == "sft.py" else Dataset.from_dict(pairs).to_list()
            (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return model, folders


@pytest.mark.parametrize("script", ["sft.py", "vrpo.py"])
def test_examples_refuse_push_to_hub_that_cannot_push(tmp_path, monkeypatch, capsys, script):
    """Checked before any training: no token, offline mode, an invalid repository id."""
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    args = ["--tiny", *SFT_DEMO, "--output_dir", tmp_path / "out", "--push_to_hub"]
    assert "needs a Hugging Face token" in refused(script, *args, monkeypatch=monkeypatch, capsys=capsys)
    invalid = [*args, "--hub_token", "hf_test", "--hub_model_id", "a/b/c"]
    assert "--hub_model_id 'a/b/c' is not a valid" in refused(script, *invalid, monkeypatch=monkeypatch, capsys=capsys)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    offline = [*args, "--hub_token", "hf_test"]
    assert "HF_HUB_OFFLINE" in refused(script, *offline, monkeypatch=monkeypatch, capsys=capsys)
    assert not (tmp_path / "out").exists()  # refused before training


@pytest.mark.parametrize("script", ["sft.py", "vrpo.py"])
def test_examples_pass_resume_revision_and_attention_flags(hub_folders, tmp_path, monkeypatch, capsys, script):
    model, data = hub_folders
    run = ["--model_name_or_path", model, "--dataset_name", data[script], "--output_dir", tmp_path / "out", *SFT_DEMO]
    run += ["--max_steps", "1", "--per_device_train_batch_size", "4"] + (
        ["--num_mc_samples", "2"] if script == "vrpo.py" else []
    )
    # Honoured: a missing checkpoint and an unknown attention backend are errors, not silently ignored.
    with pytest.raises(ValueError, match="checkpoint"):
        run_example(
            script, *run, "--resume_from_checkpoint", tmp_path / "missing", monkeypatch=monkeypatch, capsys=capsys
        )
    assert "bogus" in refused(script, *run, "--attn_implementation", "bogus", monkeypatch=monkeypatch, capsys=capsys)
    # A local folder has no revisions, nor does the in-memory demo.
    assert "has no revisions" in refused(script, *run, "--model_revision", "v2", monkeypatch=monkeypatch, capsys=capsys)
    demo = ["--tiny", *SFT_DEMO, "--output_dir", tmp_path / "demo", "--model_revision", "v2"]
    assert "loads no model" in refused(script, *demo, monkeypatch=monkeypatch, capsys=capsys)


def test_sft_example_evaluates_on_the_test_split(hub_folders, tmp_path, monkeypatch, capsys):
    model, data = hub_folders[0], hub_folders[1]["sft.py"]
    run = ["--model_name_or_path", model, "--output_dir", tmp_path / "out", *SFT_DEMO, "--max_steps", "1"]
    run += ["--attn_implementation", "eager", "--eval_strategy", "steps", "--eval_steps", "1"]
    out = run_example("sft.py", *run, "--dataset_name", data, monkeypatch=monkeypatch, capsys=capsys)
    assert "eval loss:" in out
    err = refused("sft.py", *run, "--dataset_name", data / "train.jsonl", monkeypatch=monkeypatch, capsys=capsys)
    assert "only split is 'train'" in err
    err = refused(
        "sft.py", *run, "--dataset_name", data, "--dataset_test_split", "nope", monkeypatch=monkeypatch, capsys=capsys
    )
    assert "nope" in err
