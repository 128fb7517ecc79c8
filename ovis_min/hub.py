"""The Hugging Face Hub, through `huggingface_hub` (which every install of `tokenizers` brings along).

Everything an ecosystem user expects comes from it unchanged: the cache shared with every other HF tool
(`HF_HOME`, `HF_HUB_CACHE`, `XDG_CACHE_HOME`; blobs + snapshots + refs), offline mode (`HF_HUB_OFFLINE`),
tokens (`HF_TOKEN` or `hf auth login`), any revision (branch, tag, commit, `refs/pr/N`), `local_dir` downloads,
checksums, file locks (two downloads at once), retries on 429/5xx, resumed transfers and progress bars.

What this module adds: only the files the caller names are fetched (never the repository's Python code), and
every failure becomes a `HubError` whose one-line message names the cause and the fix.
"""
import os
import re
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                    LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars, logging

from .files import disk_full


class HubError(Exception):
    """A hub operation that failed; the message names the cause and the fix."""


def cache_dir() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub, ...)."""
    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    return constants.ENDPOINT


def check_endpoint() -> None:
    """HF_ENDPOINT, when set, must be an http(s) URL: huggingface_hub would only fail later, less clearly."""
    value = os.environ.get("HF_ENDPOINT")
    if value is not None and not re.fullmatch(r"https?://[^/\s?#]+(/[^\s]*)?", value):
        raise HubError(f"HF_ENDPOINT={value!r} is not a URL: set it to a hub address such as https://huggingface.co "
                       "(or a mirror's http(s) URL), or unset it")


def download(repo_id: str, revision: str, files: list[str] | tuple[str, ...], local_dir: Path | None = None,
             progress: bool = True) -> tuple[Path, str]:
    """Fetch those of `files` that the repository has at `revision` into the cache (or `local_dir`).

    Returns the snapshot folder and the commit it is. Files already there are not fetched again; the names are
    matched literally (they are checked to hold no glob characters). The repository is looked up first, so a
    wrong id, revision or token fails here with its own message instead of falling back to what is cached.
    """
    check_endpoint()
    for name in files:
        if re.search(r"[*?\[\]]", name):
            raise HubError(f"refusing to fetch {name!r}: file names must not hold glob characters")
    # huggingface_hub logs each retry and fallback as a warning; a failure is reported once, by the HubError
    logging.set_verbosity_error()
    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        with _errors(repo_id, revision, local_dir):
            commit = HfApi().repo_info(repo_id, revision=revision).sha
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(files), local_dir=local_dir)
    finally:
        if quiet:
            enable_progress_bars()
    return Path(folder), commit


def cached(repo_id: str, revision: str) -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` (its ref, or the commit itself), complete or not;
    None when there is none. Never touches the network."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError as error:
        # newer huggingface_hub versions refuse a snapshot their tree listing shows incomplete, naming its folder;
        # whether it is usable is for the caller to judge from the files it needs
        snapshot = getattr(error, "snapshot_path", None)
        return Path(snapshot) if snapshot else None
    except (HFValidationError, OSError):
        return None


def other_snapshots(repo_id: str, besides: Path) -> list[Path]:
    """The repository's other cached snapshot folders, newest first."""
    try:
        info = huggingface_hub.scan_cache_dir(cache_dir())
    except Exception:  # no cache yet, or one that another tool left in a state scan_cache_dir refuses
        return []
    snapshots = [revision for repo in info.repos if repo.repo_id == repo_id and repo.repo_type == "model"
                 for revision in repo.revisions if Path(revision.snapshot_path) != besides]
    return [Path(r.snapshot_path) for r in sorted(snapshots, key=lambda r: r.last_modified, reverse=True)]


@contextmanager
def _errors(repo_id: str, revision: str, local_dir: Path | None):
    """huggingface_hub's exceptions as one-line HubErrors that name the cause and the fix."""
    where = f"{repo_id}@{revision}"
    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        yield
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its terms at {endpoint()}/{repo_id} (logged in), then {login} "
                       "with that account's token") from None
    except RepositoryNotFoundError:
        raise HubError(f"repository {repo_id} not found on {endpoint()}: check the id (the official one is "
                       f"AIDC-AI/Ovis-U1-3B); a private repository also needs a token: {login}") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r}: pass an existing branch, tag, commit or refs/pr/N "
                       "with --revision") from None
    except EntryNotFoundError as error:
        raise HubError(f"{where}: a file is missing on the hub ({_first_line(error)}); the repository is not a "
                       "complete checkpoint at this revision") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as error:
        if offline():
            raise HubError(f"{where} cannot be fetched: HF_HUB_OFFLINE is set and it is not in the Hugging Face "
                           f"cache ({cache_dir()}); unset HF_HUB_OFFLINE to download it") from None
        raise HubError(f"cannot reach {endpoint()} to fetch {where} ({_first_line(error.__cause__ or error)}); "
                       "check the network connection (or HF_ENDPOINT), then run the same command again") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise HubError(f"{endpoint()} refused the token (HTTP {status}) for {where}: {login} with a token "
                           "that can read this repository") from None
        if status == 429 or (status or 0) >= 500:
            raise HubError(f"{endpoint()} answered HTTP {status} for {where}, also after retrying: try again "
                           "later") from None
        raise HubError(f"{endpoint()}: {_first_line(error)} (fetching {where})") from None
    except HFValidationError as error:
        raise HubError(f"{repo_id!r} is not a hub repository id ({_first_line(error)}); ids look like "
                       "owner/name, e.g. AIDC-AI/Ovis-U1-3B") from None
    except OSError as error:
        if disk_full(error):
            raise HubError(f"disk full while downloading {where} into {local_dir or cache_dir()}: free some space, "
                           "or download elsewhere (--dir DIR, or HF_HUB_CACHE); run the same command again to "
                           "resume") from None
        if isinstance(error, PermissionError):
            raise HubError(f"cannot write {error.filename or local_dir or cache_dir()} (permission denied): choose "
                           "a folder you can write (--dir DIR, or HF_HUB_CACHE)") from None
        if isinstance(error, ConnectionError) or "connect" in type(error).__name__.lower():
            raise _unreachable(where, error) from None
        raise HubError(f"fetching {where} failed: {_first_line(error)}") from None
    except Exception as error:  # httpx's transport errors (connection lost mid-file, timeouts) are not OSErrors
        if type(error).__module__.split(".")[0].startswith("httpx"):
            raise _unreachable(where, error) from None
        raise


def _unreachable(where: str, error: BaseException) -> HubError:
    return HubError(f"cannot reach {endpoint()} while fetching {where} ({_first_line(error)}); check the network "
                    "connection (or HF_ENDPOINT), then run the same command again: finished files are kept, a "
                    "partial one resumes")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return next((line for line in text.splitlines() if line.strip()), text)
