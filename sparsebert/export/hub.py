"""Upload an export folder to the Hugging Face Hub, through ``huggingface_hub`` (``HfApi.create_repo``, then
``upload_folder``: one commit with every file).

Pre-training does it at the end of a run when ``export.push_to_hub=org/name`` is set, ``eval.run --push-to-hub``
for its best fine-tuned models; a folder whose upload failed (or any export) goes up later with

    python -m sparsebert.export.hub runs/demo/final org/name

The token is huggingface_hub's: ``HF_TOKEN``, or the one ``hf auth login`` stored; ``HF_ENDPOINT`` names another
Hub. The card is written again first, so that its loading example names the repo.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sparsebert import console

PROG = "python -m sparsebert.export.hub"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class HubError(RuntimeError):
    """An upload that did not happen; the message names the folder and the repo."""


def check_repo_id(repo_id: str, what: str = "the Hub repo") -> str:
    """``repo_id`` if it reads ``org/name``, else a ``ValueError`` naming ``what``."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise ValueError(f"{what} must be a Hub repo id 'org/name', got {repo_id!r}")
    return repo_id


def push_folder(folder: str | Path, repo_id: str, *, private: bool = True, message: str | None = None) -> str:
    """Create ``repo_id`` (a model repo; private unless ``private=False``; kept if it exists) and upload ``folder``
    as one commit; returns the commit's URL. Raises :class:`HubError` naming both when the Hub refuses or cannot be
    reached."""
    from huggingface_hub import HfApi

    from sparsebert.export.card import CARD, write_card

    folder = Path(folder)
    check_repo_id(repo_id)
    if not (folder / "config.json").is_file():
        raise HubError(f"{folder} is not a model folder (no config.json): nothing uploaded to {repo_id}")
    if (folder / CARD).is_file():
        write_card(folder, model_id=repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=message or f"Upload {folder.name} (SparseBERT export)",
            ignore_patterns=["*.tmp", ".*"],
        )
    except Exception as err:
        # The Hub's HTTP errors, an unreachable endpoint, a bad token: one line naming the folder and the repo.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubError(f"uploading {folder} to the Hub repo {repo_id} failed: {first}") from err
    return str(commit.commit_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Upload an export folder to the Hugging Face Hub."
    )
    parser.add_argument("folder", help="the export: a pre-training run's final/, a kept fine-tuned model")
    parser.add_argument("repo_id", help="the Hub repo, org/name (created if missing)")
    parser.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    args = parser.parse_args(argv)
    try:
        check_repo_id(args.repo_id)
    except ValueError as err:
        return console.usage_error(err, PROG)
    try:
        url = push_folder(args.folder, args.repo_id, private=not args.public)
    except HubError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(f"uploaded {args.folder} to {args.repo_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
