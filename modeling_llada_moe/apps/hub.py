"""Publishing a saved folder to the Hugging Face Hub as it is (model card, tokenizer and code included)."""

from __future__ import annotations

from pathlib import Path


def hub_token() -> str | None:
    """The Hugging Face token (`HF_TOKEN` or `hf auth login`), or None."""
    from huggingface_hub import get_token

    return get_token()


def push_folder(folder: str | Path, repo_id: str, private: bool = False, message: str = "Upload LLaDA-MoE") -> str:
    """Create `repo_id` (if needed) and upload `folder` unchanged; returns the repo URL.

    Not `model.push_to_hub`: in transformers 5.23 that saves again into a temporary folder, replaces README.md with a
    generic card and leaves the tokenizer out. Failures (no network, no write access) raise `OSError` naming the repo.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except Exception as err:  # httpx transport errors and the Hub's HTTP errors share no base class with OSError
        raise OSError(
            f"could not push {folder} to {repo_id} at {api.endpoint} ({type(err).__name__}: {err}); the folder is "
            f"saved, upload it later with: hf upload {repo_id} {folder} ."
        ) from err
    return str(url)


def login_help(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """What to do when no token is available: log in, or upload the ready folder later."""
    flag = " --private" if private else ""
    return (
        f"No Hugging Face token found, so nothing was pushed to {repo_id}. The folder is ready: {folder}\n"
        "To push it, log in with a token that can write (https://huggingface.co/settings/tokens):\n"
        "    hf auth login            # or: export HF_TOKEN=hf_...\n"
        "then run this again, or upload the folder as it is:\n"
        f"    hf upload {repo_id} {folder} .{flag}"
    )
