"""All-or-nothing saves into a folder.

A save writes every file into a staging folder on the same filesystem and is then committed by renames only, which
need no space: a save that fails while writing (a full disk, an exception between two files, Ctrl-C) leaves the
folder exactly as it was, and the commit also removes the files of an earlier save that the new one replaces without
writing them again (the weight files of another sharding, or, for a whole-folder save, everything).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME


STAGING_PREFIX = ".llada-moe-staging-"
BACKUP_PREFIX = ".llada-moe-previous-"


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The weight files of `folder` that `from_pretrained(folder, variant=variant)` may read: the single file, the
    index and its shards, in safetensors and in PyTorch's format."""
    if not folder.is_dir():
        return []
    names = set()
    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        stem, suffix = single.rsplit(".", 1)
        if variant is not None:
            stem = f"{stem}.{variant}"
            index = f"{index.rsplit('.', 1)[0]}.{variant}.json"
        names |= {f"{stem}.{suffix}", index}
        shard = re.compile(rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.{re.escape(suffix)}")
        names |= {entry.name for entry in folder.iterdir() if shard.fullmatch(entry.name)}
    return sorted(folder / name for name in names if (folder / name).is_file())


def check_folder_target(folder: str | os.PathLike) -> Path:
    """`folder` as a Path, or a ValueError when it names an existing file (transformers would only log that)."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"save directory {str(path)!r} is an existing file, not a folder; pass a folder path")
    return path


@contextlib.contextmanager
def staged_save(folder: str | os.PathLike, replaces: Callable[[Path], list[Path]] | None = None) -> Iterator[Path]:
    """Yields an empty staging folder to write a whole save into; when the block ends without an error, its entries
    replace the same names in `folder` and the entries `replaces(folder)` lists are removed, by renames alone (an
    error there puts everything back). When the block raises, the staging folder is deleted and `folder` is left as
    it was (created empty if it did not exist, as transformers does)."""
    folder = check_folder_target(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        yield staging
        stale = [path.name for path in (replaces(folder) if replaces else [])]
        commit(staging, folder, stale)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def commit(staging: Path, folder: Path, stale: list[str]) -> None:
    """Moves the entries of `staging` into `folder` and removes the `stale` names, by renames: what stood under a
    name moves to a backup folder first, and any failure restores it."""
    new = sorted(entry.name for entry in staging.iterdir())
    backup = Path(tempfile.mkdtemp(prefix=BACKUP_PREFIX, dir=folder))
    aside, placed = [], []
    try:
        for name in dict.fromkeys([*new, *stale]):
            if (folder / name).exists() or (folder / name).is_symlink():
                os.replace(folder / name, backup / name)
                aside.append(name)
        for name in new:
            os.replace(staging / name, folder / name)
            placed.append(name)
    except BaseException:
        for name in placed:
            os.replace(folder / name, staging / name)
        for name in aside:
            os.replace(backup / name, folder / name)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def everything_else(folder: Path) -> list[Path]:
    """For a save that replaces a whole folder: every entry but the save's own staging and backup folders."""
    return [entry for entry in folder.iterdir() if not entry.name.startswith((STAGING_PREFIX, BACKUP_PREFIX))]
