"""Bad training data and mask ids are refused before training, by both trainers: a ValueError naming the dataset, the
row and the column (and the message), never a raw TRL / datasets error and never silent training on the mask token.

Every case builds a trainer on a tiny model and two-row datasets; only the streamed (IterableDataset) cases run a step.
"""

import pytest
from conftest import QUICK_TRAINING, tiny_model, tiny_tokenizer
from datasets import Dataset, IterableDataset
from tokenizers import normalizers

from modeling_llada_moe.apps.tiny_task import LING_CHAT_TEMPLATE
from trl_ext import DiffusionSFTConfig, DiffusionSFTTrainer, VRPOConfig, VRPOTrainer
from trl_ext.data_checks import find_token


EOS, PAD, MASK = 120, 120, 126


pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = dict(per_device_train_batch_size=2, max_steps=1, **QUICK_TRAINING)


def data(rows):
    return rows if isinstance(rows, (Dataset, IterableDataset)) else Dataset.from_list(rows)


def sft(tmp_path, rows, eval_rows=None, tokenizer=None, model=None, **overrides):
    return DiffusionSFTTrainer(
        model=model or tiny_model(),
        args=DiffusionSFTConfig(output_dir=str(tmp_path), **{**SETTINGS, **overrides}),
        train_dataset=data(rows),
        eval_dataset=None if eval_rows is None else data(eval_rows),
        processing_class=tokenizer or tiny_tokenizer(),
    )


def vrpo(tmp_path, rows, eval_rows=None, tokenizer=None, model_overrides=None, **overrides):
    settings = {**SETTINGS, "num_mc_samples": 2, **overrides}
    return VRPOTrainer(
        model=tiny_model(**(model_overrides or {})),
        ref_model=tiny_model(**(model_overrides or {})),
        args=VRPOConfig(output_dir=str(tmp_path), **settings),
        train_dataset=data(rows),
        eval_dataset=None if eval_rows is None else data(eval_rows),
        processing_class=tokenizer or tiny_tokenizer(),
    )


def chat():
    return tiny_tokenizer(LING_CHAT_TEMPLATE)


def lowercasing():
    """A tokenizer that lowercases text: "T126" becomes the mask token although the text never spells "t126"."""
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tokenizer


def turn(role, content):
    return [{"role": role, "content": content}]


def conversation(user="t1", answer="t1", system=None):
    return (turn("system", system) if system else []) + turn("user", user) + turn("assistant", answer)


def changed(rows, index, **values):
    rows = [dict(row) for row in rows]
    rows[index].update(values)
    return rows


PAIRS = [{"prompt": "t1 t2 t100", "completion": " t2 t1"}, {"prompt": "t3 t100", "completion": " t3"}]
PREFERENCES = [
    {"prompt": "t1 t2", "chosen": " t2 t1", "rejected": " t1"},
    {"prompt": "t3", "chosen": " t3", "rejected": " t4"},
]
CHAT_PREFERENCES = [
    {"prompt": turn("user", "t1"), "chosen": turn("assistant", "t1"), "rejected": turn("assistant", "t2")}
]


# --- DiffusionSFTTrainer ------------------------------------------------------------------------------------------

SFT_CASES = {
    # The mask token in the data: trained on silently before.
    "mask in prompt": (changed(PAIRS, 1, prompt="t3 t126 t100"), {}, r"row 1, column 'prompt': holds the mask"),
    "mask in completion": (changed(PAIRS, 1, completion=" t126 t3"), {}, r"row 1, column 'completion': holds the mask"),
    "mask in text": (
        [{"text": "t1 t2"}, {"text": "t1 t126"}],
        {},
        r"row 1, column 'text': holds the mask token 't126'",
    ),
    "mask in a system message": (
        [{"messages": conversation()}, {"messages": conversation(system="t5 t126")}],
        dict(tokenizer=chat()),
        r"row 1, column 'messages\[0\] \(system\)': holds the mask",
    ),
    "mask in an assistant message": (
        [{"messages": conversation()}, {"messages": conversation(answer="t126")}],
        dict(tokenizer=chat()),
        r"row 1, column 'messages\[1\] \(assistant\)': holds the mask",
    ),
    "mask in tokenized input_ids": (
        [{"input_ids": [1, 2, 3]}, {"input_ids": [1, MASK, 3]}],
        {},
        r"row 1, column 'input_ids': holds the mask token \(id 126\) at position 1",
    ),
    "mask made by the tokenizer's normalizer": (
        changed(PAIRS, 1, completion=" T126"),
        dict(tokenizer=lowercasing()),
        r"row 1, column 'input_ids': the tokenized row holds the mask token \(id 126\) at position 2, in its response",
    ),
    # Raw TRL / datasets errors before.
    "None completion": (changed(PAIRS, 1, completion=None), {}, r"row 1, column 'completion': is None"),
    "None prompt": (changed(PAIRS, 1, prompt=None), {}, r"row 1, column 'prompt': is None"),
    "None text": ([{"text": "t1"}, {"text": None}], {}, r"row 1, column 'text': is None"),
    "int completions": ([{"prompt": "t1", "completion": 5}] * 2, {}, r"row 0, column 'completion': is of type int"),
    "missing completion column": ([{"prompt": "t1"}] * 2, {}, r"columns \['prompt'\].*missing 'completion'"),
    "no known column": ([{"question": "t1", "answer": "t2"}] * 2, {}, r"columns \['question', 'answer'\]; expected"),
    "empty dataset": (Dataset.from_dict({"prompt": [], "completion": []}), {}, r"train_dataset is empty"),
    "every prompt longer than max_length": (PAIRS, dict(max_length=2), r"train_dataset: every row \(2\) was dropped"),
    "conversation without an assistant turn": (
        [{"messages": conversation()}, {"messages": turn("user", "t1")}],
        dict(tokenizer=chat()),
        r"row 1, column 'messages': has no assistant turn",
    ),
    "conversational prompt, plain completion": (
        [{"prompt": turn("user", "t1"), "completion": " t2"}] * 2,
        dict(tokenizer=chat()),
        r"row 0, column 'completion': is plain text but row 0, column 'prompt' is conversational",
    ),
    "messages given as a string": (
        [{"messages": "t1 t2"}] * 2,
        dict(tokenizer=chat()),
        r"row 0, column 'messages': is a string; expected a list",
    ),
    # Trained silently before.
    "empty completion": (changed(PAIRS, 1, completion=""), {}, r"row 1, column 'completion': is empty"),
    "whitespace text": ([{"text": "t1"}, {"text": "  "}], {}, r"row 1, column 'text': is empty"),
    "empty input_ids": ([{"input_ids": [1, 2]}, {"input_ids": []}], {}, r"row 1, column 'input_ids': has no tokens"),
    "message without a role": (
        [{"messages": conversation()}, {"messages": [{"content": "t1"}, *turn("assistant", "t1")]}],
        dict(tokenizer=chat()),
        r"row 1, column 'messages\[0\]': has no 'role'",
    ),
    "message with None content": (
        [{"messages": conversation()}, {"messages": conversation(answer=None)}],
        dict(tokenizer=chat()),
        r"row 1, column 'messages\[1\]': has no 'content'",
    ),
    "every eval prompt longer than max_length": (
        PAIRS,
        dict(eval_rows=[{"prompt": "t1 t2 t3 t4 t5", "completion": " t1"}], max_length=4),
        r"eval_dataset: every row \(1\) was dropped",
    ),
    "mask in an eval completion": (
        PAIRS,
        dict(eval_rows=changed(PAIRS, 0, completion=" t126")),
        r"eval_dataset row 0, column 'completion': holds the mask",
    ),
    "empty eval dataset": (PAIRS, dict(eval_rows=Dataset.from_dict({"text": []})), r"eval_dataset is empty"),
}


@pytest.mark.parametrize("case", SFT_CASES)
def test_sft_refuses_bad_rows_naming_row_and_column(tmp_path, case):
    rows, options, message = SFT_CASES[case]
    with pytest.raises(ValueError, match=message):
        sft(tmp_path, rows, **options)


def test_sft_checks_every_eval_dataset_and_datasets_given_to_evaluate(tmp_path):
    with pytest.raises(ValueError, match=r"eval_dataset\['b'\] row 0, column 'prompt': is None"):
        DiffusionSFTTrainer(
            model=tiny_model(),
            args=DiffusionSFTConfig(output_dir=str(tmp_path), **SETTINGS),
            train_dataset=data(PAIRS),
            eval_dataset={"a": data(PAIRS), "b": data(changed(PAIRS, 0, prompt=None))},
            processing_class=tiny_tokenizer(),
        )
    trainer = sft(tmp_path, PAIRS)
    with pytest.raises(ValueError, match=r"eval_dataset row 1, column 'completion': is None"):
        trainer.evaluate(data(changed(PAIRS, 1, completion=None)))


def test_sft_formatting_func_must_return_text(tmp_path):
    with pytest.raises(ValueError, match=r"formatting_func returned None for the row \{'q': 't1'\}"):
        DiffusionSFTTrainer(
            model=tiny_model(),
            args=DiffusionSFTConfig(output_dir=str(tmp_path), **SETTINGS),
            train_dataset=data([{"q": "t1"}] * 2),
            formatting_func=lambda example: None,
            processing_class=tiny_tokenizer(),
        )


def streamed(rows):
    return IterableDataset.from_generator(lambda: iter(rows))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (changed(PAIRS, 1, completion=None), r"row 1, column 'completion': is None"),
        (
            [PAIRS[0], {"prompt": turn("user", "t1"), "completion": turn("assistant", "t1")}],
            r"row 1, column 'prompt': is conversational but row 0, column 'prompt' is plain text",
        ),
    ],
)
def test_sft_streamed_rows_are_checked_as_they_arrive(tmp_path, rows, message):
    trainer = sft(tmp_path, streamed(rows), tokenizer=chat())
    with pytest.raises(ValueError, match=message):
        trainer.train()


@pytest.mark.parametrize(
    ("overrides", "model_overrides", "message"),
    [
        (dict(mask_token_id=EOS), {}, r"mask_token_id=120 equals the model config's eos_token_id=120"),
        ({}, dict(mask_token_id=EOS), r"mask_token_id=120 equals the model config's eos_token_id=120"),
        ({}, dict(pad_token_id=MASK), r"mask_token_id=126 equals the model config's pad_token_id=126"),
    ],
)
def test_mask_token_id_equal_to_eos_or_pad_is_refused(tmp_path, overrides, model_overrides, message):
    with pytest.raises(ValueError, match=message):
        sft(tmp_path, PAIRS, model=tiny_model(**model_overrides), **overrides)
    with pytest.raises(ValueError, match=message):
        vrpo(tmp_path, PREFERENCES, model_overrides=model_overrides, **overrides)


def test_mask_token_id_equal_to_the_tokenizers_pad_is_refused(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = "t126"
    with pytest.raises(ValueError, match=r"mask_token_id=126 equals the tokenizer's pad_token_id=126"):
        sft(tmp_path, PAIRS, tokenizer=tokenizer)


def test_sft_skip_prepare_dataset_still_refuses_the_mask_token(tmp_path):
    rows = [
        {"input_ids": [1, 2, EOS], "labels": [-100, 2, EOS]},
        {"input_ids": [3, MASK, EOS], "labels": [-100, 4, EOS]},
    ]
    with pytest.raises(ValueError, match=r"train_dataset row 1, column 'input_ids': the tokenized row holds the mask"):
        sft(tmp_path, rows, dataset_kwargs={"skip_prepare_dataset": True})


# --- VRPOTrainer --------------------------------------------------------------------------------------------------

VRPO_CASES = {
    "mask in prompt": (changed(PREFERENCES, 1, prompt="t126 t3"), {}, r"row 1, column 'prompt': holds the mask"),
    "mask in chosen": (changed(PREFERENCES, 1, chosen=" t126"), {}, r"row 1, column 'chosen': holds the mask"),
    "mask in rejected": (changed(PREFERENCES, 1, rejected=" t4 t126"), {}, r"row 1, column 'rejected': holds the mask"),
    "mask in a chosen message": (
        [{**CHAT_PREFERENCES[0], "chosen": turn("assistant", "t2 t126")}] * 2,
        dict(tokenizer=chat()),
        r"row 0, column 'chosen\[0\] \(assistant\)': holds the mask",
    ),
    "mask made by the tokenizer's normalizer": (
        changed(PREFERENCES, 1, rejected=" T126"),
        dict(tokenizer=lowercasing()),
        r"row 1, column 'rejected_ids': the tokenized row holds the mask token \(id 126\) at position 0",
    ),
    "mask in an eval chosen": (
        PREFERENCES,
        dict(eval_rows=changed(PREFERENCES, 1, chosen=" t126")),
        r"eval_dataset row 1, column 'chosen': holds the mask",
    ),
    "None chosen": (changed(PREFERENCES, 1, chosen=None), {}, r"row 1, column 'chosen': is None"),
    "None prompt": (changed(PREFERENCES, 1, prompt=None), {}, r"row 1, column 'prompt': is None"),
    "int rejected": ([{"prompt": "t1", "chosen": " t1", "rejected": 2}] * 2, {}, r"column 'rejected': is of type int"),
    "empty chosen": (changed(PREFERENCES, 1, chosen=""), {}, r"row 1, column 'chosen': is empty"),
    "missing rejected column": ([{"prompt": "t1", "chosen": " t1"}] * 2, {}, r"missing \['rejected'\]"),
    "empty dataset": (Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}), {}, r"train_dataset is empty"),
    "every prompt longer than max_length": (PREFERENCES, dict(max_length=1), r"every row \(2\) was dropped"),
    "chosen without an assistant turn": (
        [CHAT_PREFERENCES[0], {**CHAT_PREFERENCES[0], "chosen": turn("user", "t1")}],
        dict(tokenizer=chat()),
        r"row 1, column 'chosen': has no assistant turn",
    ),
    "empty chosen conversation": (
        [CHAT_PREFERENCES[0], {**CHAT_PREFERENCES[0], "chosen": []}],
        dict(tokenizer=chat()),
        r"row 1, column 'chosen': is an empty conversation",
    ),
    "conversational chosen, plain rejected": (
        [{**CHAT_PREFERENCES[0], "rejected": " t2"}] * 2,
        dict(tokenizer=chat()),
        r"row 0, column 'rejected': is plain text but row 0, column 'prompt' is conversational",
    ),
}


@pytest.mark.parametrize("case", VRPO_CASES)
def test_vrpo_refuses_bad_rows_naming_row_and_column(tmp_path, case):
    rows, options, message = VRPO_CASES[case]
    with pytest.raises(ValueError, match=message):
        vrpo(tmp_path, rows, **options)


def test_vrpo_checks_datasets_given_to_evaluate(tmp_path):
    trainer = vrpo(tmp_path, PREFERENCES)
    with pytest.raises(ValueError, match=r"eval_dataset row 1, column 'chosen': is None"):
        trainer.evaluate(data(changed(PREFERENCES, 1, chosen=None)))


# --- the vectorised token scan ------------------------------------------------------------------------------------


def test_find_token_reports_the_first_row_column_and_position():
    rows = [{"a": [1, 2], "b": [3]}, {"a": [4], "b": [5, 6, 7]}, {"a": [], "b": [7]}]
    dataset = Dataset.from_list(rows).select([2, 1, 0])  # an index mapping: rows in a new order
    assert find_token(dataset, ["a", "b"], 7) == (0, "b", 0)
    assert find_token(dataset, ["a", "b"], 6) == (1, "b", 1)
    assert find_token(dataset, ["a", "b"], 2) == (2, "a", 1)
    assert find_token(dataset, ["a", "b"], 9) is None
