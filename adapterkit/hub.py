"""Publishing adapters to the Hugging Face Hub and downloading them, through huggingface_hub.

Uploads go in one commit; downloads use the Hub cache, so an adapter once fetched loads
offline (``HF_HUB_OFFLINE=1``) and, when the Hub is unreachable, from the cached copy.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from adapterkit.errors import AdapterNotFoundError, HubError

logger = logging.getLogger(__name__)

#: Files an adapter folder may hold; anything else (pickles above all) is never fetched.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "README.md"]


def _is_connection_error(err: BaseException) -> bool:
    """OSErrors and the HTTP client's transport errors (httpx's are not OSErrors)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return isinstance(err, OSError) or bool(names & {"TransportError", "NetworkError", "TimeoutException", "ConnectError"})


def publish(
    path_or_model: str | os.PathLike | nn.Module,
    repo_id: str,
    *,
    name: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload an adapter folder (or a model's adapter, saved first) to ``repo_id`` in one commit.

    Creates the repo (and the branch ``revision``) if needed.

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from adapterkit.artifacts import read_sidecar, save

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="adapterkit-publish-") as tmp:
        if isinstance(path_or_model, nn.Module):
            folder = save(path_or_model, Path(tmp) / "adapter", name=name)
        else:
            folder = Path(path_or_model)
            if not folder.is_dir():
                raise AdapterNotFoundError(f"Cannot publish {folder}: it is not a folder. Save the adapter first.")
            read_sidecar(folder)  # refuse damaged or too-new folders before uploading
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                revision=revision,
                commit_message=commit_message or f"Upload adapter {folder.name} with adapterkit",
                allow_patterns=ALLOW_PATTERNS,
            )
        except HfHubHTTPError as err:
            raise HubError(f"Publishing to {repo_id} failed: {err}") from err
        except Exception as err:
            if not _is_connection_error(err):
                raise
            raise HubError(f"Publishing to {repo_id} failed: the Hub is unreachable ({err}).") from err
    logger.info("Published %s to %s", folder, info.commit_url)
    return info.commit_url


def download(repo_id: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """The local folder of adapter ``repo_id`` at ``revision``, from the Hub cache or the Hub.

    Raises:
        AdapterNotFoundError: the repo, or the revision, does not exist.
        HubError: the Hub is unreachable and the cache has no copy.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kwargs: dict[str, Any] = {"revision": revision, "allow_patterns": ALLOW_PATTERNS, "token": token}
    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except RevisionNotFoundError as err:
        raise AdapterNotFoundError(f"{repo_id} has no revision {revision!r}. Check the branch, tag or commit.") from err
    except GatedRepoError as err:
        raise HubError(f"{repo_id} is gated: accept its terms on the Hub and log in (hf auth login).") from err
    except RepositoryNotFoundError as err:
        raise AdapterNotFoundError(
            f"No adapter repo {repo_id!r} on the Hub (or it is private and no token was given). "
            "Check the id, log in with `hf auth login`, or pass a local folder."
        ) from err
    except LocalEntryNotFoundError as err:
        raise HubError(
            f"Cannot download {where}: the Hub is unreachable (or HF_HUB_OFFLINE=1) and the cache has no copy. "
            "Connect once to fill the cache, or pass a local folder."
        ) from err
    except Exception as err:
        if not _is_connection_error(err):
            raise
        try:
            folder = Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        except Exception:
            raise HubError(f"Cannot download {where}: the Hub is unreachable ({err}) and the cache has no copy.") from err
        logger.warning("The Hub is unreachable (%s); using the cached copy of %s.", err, where)
        return folder
