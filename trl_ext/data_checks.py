"""Dataset and token-id checks shared by the trainers, run once before training.

TRL reads a dataset lazily and fails deep inside `datasets.map` on bad rows (`AttributeError` on a `None` completion,
`KeyError` on a missing column, `StopIteration` on an empty dataset), or trains on them silently (the mask token inside
a prompt or a response, an empty response, a turn without a role). These checks turn each into a `ValueError` naming
the dataset, the row index, the column (and the message) and the value, shortened:

- `check_dataset`: before preparation, in one pass over the rows (lazily, as rows stream, for an `IterableDataset`);
- `check_prepared_tokens`: after tokenization, a vectorised search (`find_token`) for the mask id in the token-id
  columns, which catches what the text check cannot see (a mask id produced by the tokenizer or the chat template);
- `check_not_emptied`: TRL's preparation dropping every row (every prompt fills `max_length`);
- `check_mask_token_id`: a mask id equal to the EOS or pad id (the model could never tell a mask from padding).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, IterableDataset


# Column roles: a prompt may be empty; a response (completion, chosen, rejected, LM text) must hold text, and, when
# conversational, an assistant turn; a conversation (`messages`) needs an assistant turn when only those are trained.
PROMPT, RESPONSE, CONVERSATION, TOKEN_IDS = "prompt", "response", "conversation", "token ids"
ROWS_PER_READ = 1024
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Column:
    name: str
    role: str


def shorten(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dataset_name(name: str, key: str | None = None) -> str:
    return name if key is None else f"{name}[{key!r}]"


def named_datasets(train_dataset, eval_dataset) -> list[tuple[str, Any]]:
    """(name, dataset) of the train dataset and of each given eval dataset (one, or a dict of them by key)."""
    named = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, dict):
        named += [(dataset_name("eval_dataset", key), dataset) for key, dataset in eval_dataset.items()]
    elif eval_dataset is not None:
        named.append(("eval_dataset", eval_dataset))
    return named


def prepared_dataset_name(trl_name: str) -> str:
    """The argument name of the dataset TRL's `_prepare_dataset` calls "train", "eval" or by its eval key."""
    return {"train": "train_dataset", "eval": "eval_dataset"}.get(trl_name) or dataset_name("eval_dataset", trl_name)


def check_container(dataset, name: str) -> None:
    """A `datasets.Dataset` / `IterableDataset` with at least one row (checked before TRL reads its first row)."""
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(
            f"{name}: expected a datasets.Dataset or IterableDataset (e.g. Dataset.from_list(rows)), got "
            f"{type(dataset).__name__}"
        )
    empty = len(dataset) == 0 if isinstance(dataset, Dataset) else next(iter(dataset), None) is None
    if empty:
        raise ValueError(f"{name} is empty (no rows): there is nothing to train or evaluate on")


def check_containers(train_dataset, eval_dataset) -> None:
    """`check_container` of the train dataset and of every eval dataset given (one, or a dict of them by key)."""
    for name, dataset in named_datasets(train_dataset, eval_dataset):
        if dataset is not None or name == "train_dataset":
            check_container(dataset, name)


def check_mask_token_id(mask_token_id: int, *, config=None, tokenizer=None) -> None:
    """The mask id must differ from every EOS and pad id of the model config and the tokenizer: the EOS tail and the
    padding would otherwise read as masked positions (and be scored as such)."""
    sources = []
    if config is not None:
        eos = getattr(config, "eos_token_id", None)
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        sources += [("the model config's eos_token_id", token) for token in eos]
        sources.append(("the model config's pad_token_id", getattr(config, "pad_token_id", None)))
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer is not None:
        sources.append(("the tokenizer's eos_token_id", getattr(tokenizer, "eos_token_id", None)))
        sources.append(("the tokenizer's pad_token_id", getattr(tokenizer, "pad_token_id", None)))
    for source, token in sources:
        if token is not None and token == mask_token_id:
            raise ValueError(
                f"mask_token_id={mask_token_id} equals {source}={token}: the mask token must be its own id, or every "
                "EOS / pad position reads as masked; set mask_token_id (or the model config's) to the mask token's id"
            )


class _RowChecker:
    """Checks rows one at a time; remembers whether the data is conversational (set by the first row)."""

    def __init__(self, name, columns, mask_token_id, tokenizer, require_assistant, vocab_size):
        self.name, self.columns, self.mask_token_id, self.vocab_size = name, columns, mask_token_id, vocab_size
        self.require_assistant = require_assistant
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.mask_text = self._mask_text()
        self.kind: tuple[int, str, str] | None = None  # (row, column, "conversational" | "plain text")

    def _mask_text(self) -> str | None:
        """The mask token as it may be typed in text (the tokenizer's string for the mask id), when it has one."""
        if self.mask_token_id is None or self.tokenizer is None:
            return None
        try:
            token = self.tokenizer.convert_ids_to_tokens(self.mask_token_id)
        except (IndexError, KeyError, OverflowError, TypeError):
            return None
        return token if isinstance(token, str) and token else None

    def fail(self, row: int, column: str, problem: str, value: Any) -> None:
        raise ValueError(f"{self.name} row {row}, column {column!r}: {problem} (value: {shorten(value)})")

    def __call__(self, row: int, example: dict[str, Any]) -> None:
        for column in self.columns:
            value = example.get(column.name)
            if column.role == TOKEN_IDS:
                self._token_ids(row, column.name, value)
            else:
                self._text_or_messages(row, column, value)

    def _token_ids(self, row: int, column: str, value: Any) -> None:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(token, int) and not isinstance(token, bool) for token in value
        ):
            self.fail(row, column, "expected a list of token ids (ints)", value)
        if not value:
            self.fail(row, column, "has no tokens", value)
        if self.mask_token_id is not None and self.mask_token_id in value:
            self.fail(
                row,
                column,
                f"holds the mask token (id {self.mask_token_id}) at position "
                f"{list(value).index(self.mask_token_id)}: it would be trained on as data",
                value,
            )
        if self.vocab_size is not None and not all(0 <= token < self.vocab_size for token in value):
            self.fail(row, column, f"has token ids outside the vocabulary [0, {self.vocab_size})", value)

    def _kind(self, row: int, column: str, kind: str, value: Any) -> None:
        if self.kind is None:
            self.kind = (row, column, kind)
        elif self.kind[2] != kind:
            first_row, first_column, first_kind = self.kind
            self.fail(
                row,
                column,
                f"is {kind} but row {first_row}, column {first_column!r} is {first_kind}: conversational "
                "and plain-text data cannot be mixed (use one format in every row and column)",
                value,
            )

    def _text_or_messages(self, row: int, column: Column, value: Any) -> None:
        name = column.name
        if value is None:
            self.fail(row, name, "is None; expected a string or a list of {'role', 'content'} messages", value)
        if isinstance(value, str) and column.role == CONVERSATION:
            self.fail(row, name, "is a string; expected a list of {'role', 'content'} messages", value)
        if isinstance(value, str):
            self._kind(row, name, "plain text", value)
            if column.role != PROMPT and not value.strip():
                self.fail(row, name, "is empty: the row would train on the EOS token alone", value)
            self._mask(row, name, value, value)
        elif isinstance(value, list):
            self._kind(row, name, "conversational", value)
            self._messages(row, column, value)
        else:
            self.fail(
                row,
                name,
                f"is of type {type(value).__name__}; expected a string or a list of {{'role', 'content'}} messages",
                value,
            )

    def _messages(self, row: int, column: Column, messages: list) -> None:
        name = column.name
        roles = []
        for index, message in enumerate(messages):
            where = f"{name}[{index}]"
            if not isinstance(message, dict):
                self.fail(row, where, "is not a message: expected a dict with 'role' and 'content'", message)
            role = message.get("role", message.get("from"))  # ShareGPT rows use from / value
            content = message.get("content", message.get("value"))
            if not isinstance(role, str) or not role:
                self.fail(row, where, "has no 'role' (expected 'system', 'user', 'assistant', ...)", message)
            if content is None and not message.get("tool_calls"):
                self.fail(row, where, "has no 'content' (None): the chat template would render the word None", message)
            if content is not None and not isinstance(content, (str, list)):
                self.fail(row, where, f"'content' is of type {type(content).__name__}; expected a string", message)
            texts = (
                [content]
                if isinstance(content, str)
                else [part.get("text") for part in content or () if isinstance(part, dict)]
            )
            for text in texts:
                if isinstance(text, str):
                    self._mask(row, f"{where} ({role})", text, message)
            roles.append(role)
        if column.role == RESPONSE and not messages:
            self.fail(row, name, "is an empty conversation: the row would train on nothing", messages)
        needs_assistant = column.role == RESPONSE or (column.role == CONVERSATION and self.require_assistant)
        if needs_assistant and "assistant" not in roles:
            self.fail(row, name, f"has no assistant turn (roles: {roles}): there is no response to train on", messages)

    def _mask(self, row: int, column: str, text: str, value: Any) -> None:
        """The mask token typed in text; confirmed by tokenizing the text, so a look-alike substring is not refused."""
        if self.mask_text is None or self.mask_text not in text:
            return
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.mask_token_id in ids:
            self.fail(
                row,
                column,
                f"holds the mask token {self.mask_text!r} (id {self.mask_token_id}): the model would be "
                "trained to read or predict it as data; remove it from the data",
                value,
            )


def _rows(dataset: Dataset, columns: list[str]) -> Iterator[dict[str, Any]]:
    present = [column for column in columns if column in dataset.column_names]
    if not present:
        yield from ({} for _ in range(len(dataset)))
        return
    for batch in dataset.select_columns(present).iter(batch_size=ROWS_PER_READ):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def check_dataset(
    dataset: Dataset | IterableDataset,
    name: str,
    columns: Sequence[Column],
    *,
    mask_token_id: int | None = None,
    tokenizer=None,
    require_assistant: bool = False,
    vocab_size: int | None = None,
) -> Dataset | IterableDataset:
    """Every row of `dataset` against `columns`: no None, the right type (a string, a list of messages with a role
    and content, or a list of token ids), conversational or plain text throughout, a response with text (and an
    assistant turn), no mask token. A `Dataset` is checked now in one pass; an `IterableDataset` is returned with the
    checks applied to each row as it streams."""
    checker = _RowChecker(name, columns, mask_token_id, tokenizer, require_assistant, vocab_size)
    if isinstance(dataset, IterableDataset):

        def check(example, index):
            checker(index, example)
            return example

        return dataset.map(check, with_indices=True)
    for row, example in enumerate(_rows(dataset, [column.name for column in columns])):
        checker(row, example)
    return dataset


def column_names(dataset: Dataset | IterableDataset) -> list[str]:
    """The dataset's columns (an `IterableDataset` without known features: its first row's keys)."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())


def find_token(dataset: Dataset, columns: Sequence[str], token_id: int) -> tuple[int, str, int] | None:
    """The first (row, column, position) where `token_id` occurs in the token-id `columns` of a `Dataset`, or None:
    a vectorised scan (pyarrow), no Python loop over rows."""
    arrow = dataset.with_format("arrow")
    for column in columns:
        if column not in dataset.column_names:
            continue
        ids = arrow[column]
        ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        flat = pc.list_flatten(ids)
        hits = pc.equal(flat, pa.scalar(token_id, flat.type))
        if not pc.any(hits).as_py():
            continue
        first = pc.index(hits, True).as_py()
        row = pc.list_parent_indices(ids)[first].as_py()
        return row, column, first - (ids.offsets[row].as_py() - ids.offsets[0].as_py())
    return None


def check_prepared_tokens(raw, prepared, name: str, columns: Sequence[str], mask_token_id: int, part=None):
    """The mask id must not occur in the tokenized `columns` of a prepared dataset (what the text check cannot see:
    a tokenizer normalising text into the mask token, a chat template emitting it, pre-tokenized rows). `part(row,
    column, position)` names the part of the row it falls in. Returns `prepared` (an `IterableDataset` is checked as
    it streams)."""

    def fail(row: int, column: str, position: int, example) -> None:
        where = f"row {row}" if isinstance(raw, Dataset) and len(raw) == len(prepared) else f"prepared row {row}"
        in_part = f", in its {part(example, column, position)}" if part is not None else ""
        raise ValueError(
            f"{name} {where}, column {column!r}: the tokenized row holds the mask token (id {mask_token_id}) at "
            f"position {position}{in_part}: it would be trained on as data; remove it from the data (value: "
            f"{shorten(example[column])})"
        )

    if isinstance(prepared, IterableDataset):

        def check(example, index):
            for column in columns:
                if mask_token_id in (example.get(column) or ()):
                    fail(index, column, list(example[column]).index(mask_token_id), example)
            return example

        return prepared.map(check, with_indices=True)
    found = find_token(prepared, columns, mask_token_id)
    if found is not None:
        row, column, position = found
        fail(row, column, position, prepared[row])
    return prepared


def check_not_emptied(raw, prepared, name: str, max_length: int | None, what: str) -> None:
    """TRL drops the rows that keep no response token within `max_length`: an error when it dropped every row, a
    warning naming how many otherwise."""
    if not isinstance(raw, Dataset) or not isinstance(prepared, Dataset) or len(raw) == len(prepared):
        return
    if len(prepared) == 0:
        raise ValueError(
            f"{name}: every row ({len(raw)}) was dropped because {what} fills max_length={max_length} (row 0: "
            f"{shorten(raw[0])}); raise max_length or shorten the prompts"
        )
    logger.warning(
        f"{name}: {len(raw) - len(prepared)} of {len(raw)} rows were dropped because {what} fills "
        f"max_length={max_length}"
    )
