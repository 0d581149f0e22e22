"""The local dataset of the test tasks: `reversal.jsonl` beside this file, as a one-split DatasetDict (no Hub)."""

import json
from pathlib import Path

import datasets


def load(**metadata) -> datasets.DatasetDict:
    """lm-eval's `custom_dataset` hook (it passes the model arguments as metadata, which are not needed here)."""
    lines = (Path(__file__).parent / "reversal.jsonl").read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})
