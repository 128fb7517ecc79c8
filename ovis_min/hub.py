"""The Hugging Face Hub, through `huggingface_hub` (which every install of `tokenizers` brings along).

Everything an ecosystem user expects comes from it unchanged: the cache shared with every other HF tool
(`HF_HOME`, `HF_HUB_CACHE`, `XDG_CACHE_HOME`; blobs + snapshots + refs), offline mode (`HF_HUB_OFFLINE`),
tokens (`HF_TOKEN` or `hf auth login`), any revision (branch, tag, commit, `refs/pr/N`), `local_dir` downloads,
checksums, file locks (two downloads at once), retries on 429/5xx, resumed transfers and progress bars.

What this module adds: only the files the caller names are fetched (never the repository's Python code), and
every failure becomes a `HubError` whose one-line message names the cause and the fix. On top of that, where a
checkpoint comes from: `resolve_source` turns a directory, a train.py run directory or a hub id into a complete
checkpoint directory (completing or passing over incomplete cached snapshots), and `download_checkpoint` fetches
exactly the files the model needs.
"""
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                    LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars, logging

from .checkpoint import (CONFIG_FILE, DEFAULT_REPO, HUB_IDS, INDEX_FILE, LATEST_FILE, OPTIONAL_FILES,
                         REQUIRED_FILES, SINGLE_FILE, CheckpointError, download_hint, few_names, missing_files,
                         open_checkpoint, read_index)
from .files import disk_full
from .prompt import SLOW_TOKENIZER_FILES, TOKENIZER_FILE, missing_tokenizer_files

# What a download fetches before the shards; the shards follow once the index has named them.
SMALL_FILES = (*REQUIRED_FILES, INDEX_FILE, *OPTIONAL_FILES)


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


# ---------------------------------------------------------------------------------------------------------------
# Where a checkpoint comes from
# ---------------------------------------------------------------------------------------------------------------

def newest_step(run_directory: Path) -> Path | None:
    """The step directory a train.py run directory's `latest` file names, or None where there is none."""
    latest = run_directory / LATEST_FILE
    if not latest.is_file():
        return None
    name = latest.read_text(errors="replace").strip()
    if (run_directory / name).resolve().parent != run_directory.resolve():  # only the run's own steps are read
        raise CheckpointError(f"{latest} names {name[:60]!r}, not one of the run's step directories; fix or remove "
                              "that file")
    return run_directory / name


def looks_like_hub_id(source: str | Path) -> bool:
    """`owner/name` as the hub spells repository ids (a relative path such as `ckpt/x` reads the same)."""
    return re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", str(source)) is not None


def _finish_command(repo_id: str, revision: str) -> str:
    return f"python weights.py download {repo_id}" + ("" if revision == "main" else f" --revision {revision}")


def resolve_source(source: str | Path, revision: str = "main", download: bool = False) -> Path:
    """A checkpoint directory for `source`: an existing directory (a train.py run directory stands for its
    newest checkpoint, named by its `latest` file), or a hub id found complete in the Hugging Face cache.

    A hub id that is not cached, or cached incompletely, is downloaded (completed) if `download` and not offline.
    Otherwise an incomplete snapshot is named with what it lacks and the command that finishes it; for a branch or
    tag, a complete older snapshot of the same repository is used instead, with a note on stderr.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        newest = None if (path / CONFIG_FILE).is_file() else newest_step(path)
        return newest or path
    repo_id = str(source)
    if not looks_like_hub_id(repo_id):
        raise CheckpointError(f"no checkpoint directory {source}; {download_hint(source)}")
    incomplete = None  # (snapshot, repo id, missing files) of the first partial snapshot found
    candidates = [repo_id] + [other for other in HUB_IDS if repo_id in HUB_IDS and other != repo_id]
    for candidate in candidates:
        snapshot = cached(candidate, revision)
        if snapshot is None:
            continue
        missing = missing_files(snapshot)
        if not missing:
            return snapshot
        incomplete = incomplete or (snapshot, candidate, missing)
    if download and not offline():
        if incomplete is None:
            _note(f"{repo_id}@{revision} is not in the Hugging Face cache ({cache_dir()}): downloading it")
        else:
            _note(f"the cached {repo_id}@{revision} is incomplete (missing {few_names(incomplete[2], 3)}): "
                  "completing it")
        return download_checkpoint(repo_id, revision=revision)
    if incomplete is None:
        if offline() and download:
            raise CheckpointError(f"{repo_id}@{revision} is not in the Hugging Face cache ({cache_dir()}) and "
                                  "HF_HUB_OFFLINE is set, so it cannot be downloaded: unset HF_HUB_OFFLINE, or use a "
                                  "checkpoint directory")
        raise CheckpointError(f"{repo_id} is neither a directory nor in the Hugging Face cache ({cache_dir()}); "
                              f"download it with: {_finish_command(repo_id, revision)}")
    snapshot, candidate, missing = incomplete
    finish = _finish_command(candidate, revision) + (" (with network access: unset HF_HUB_OFFLINE)"
                                                     if offline() else "")
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        for older in other_snapshots(candidate, besides=snapshot):
            if not missing_files(older):
                _note(f"note: the cached {candidate}@{revision} ({snapshot.name[:12]}) is incomplete (missing "
                      f"{few_names(missing, 3)}); using the complete snapshot {older.name[:12]}; finish the newer one "
                      f"with: {finish}")
                return older
    raise CheckpointError(f"the cached {candidate}@{revision} ({snapshot}) is incomplete: missing "
                          f"{few_names(missing)}; finish it with: {finish}")


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def download_checkpoint(repo_id: str = DEFAULT_REPO, local_dir: Path | str | None = None, revision: str = "main",
                        progress: bool = True) -> Path:
    """Fetch the checkpoint files of `repo_id` at `revision` into the Hugging Face cache, or into `local_dir`
    (huggingface_hub's local_dir layout), and check them. Returns the checkpoint directory.

    First the small files (configs, index, the tokenizer in whichever form the repository has), then exactly the
    shards its index names, pinned to the same commit. Python files are never fetched. Files already complete
    are kept, so an interrupted download resumes when run again.
    """
    local_dir = Path(local_dir).expanduser() if local_dir is not None else None
    if local_dir is not None and local_dir.exists() and not local_dir.is_dir():
        raise CheckpointError(f"--dir {local_dir} is a file, not a folder: choose another --dir")
    where = f"{repo_id}@{revision}"
    try:
        folder, commit = download(repo_id, revision, SMALL_FILES, local_dir, progress)
        lacking = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        lacking += missing_tokenizer_files(folder)
        if lacking:
            raise CheckpointError(f"{where} is not an Ovis-U1 checkpoint: the repository has no {', '.join(lacking)} "
                                  f"(a tokenizer is {TOKENIZER_FILE} or {', '.join(SLOW_TOKENIZER_FILES)}); check "
                                  "the repository id and --revision")
        shards = (list(dict.fromkeys(read_index(folder)[0].values())) if (folder / INDEX_FILE).is_file()
                  else [SINGLE_FILE])
        folder, _ = download(repo_id, commit, shards, local_dir, progress)
    except HubError as error:
        raise CheckpointError(str(error)) from None
    absent = [shard for shard in shards if not (folder / shard).is_file()]
    if absent:
        what = (f"the shards its {INDEX_FILE} names: {few_names(absent)}" if (folder / INDEX_FILE).is_file()
                else f"weights ({INDEX_FILE} or {SINGLE_FILE})")
        raise CheckpointError(f"{where} is not a complete checkpoint: the repository lacks {what}")
    open_checkpoint(folder)  # every shard readable and as long as its header says; the index fits the shards
    return folder
