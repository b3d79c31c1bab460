"""Push a training run to the Hugging Face Hub, and fetch a checkpoint back from it.

The training loop builds a :class:`HubPusher` with :meth:`HubPusher.from_config` on the main process, calls
:meth:`~HubPusher.on_save` after each complete ``checkpoint-<step>`` folder and :meth:`~HubPusher.on_end` once the final
files are in ``output_dir``. ``hub_strategy`` has the HF Trainer's meanings:

* ``end``: one push of the final files at the end.
* ``every_save``: also push the model files of each saved checkpoint to the repo root, in the background.
* ``checkpoint``: like ``every_save``, and also mirror the latest checkpoint folder into ``last-checkpoint/`` so that
  a run can resume from the Hub (see :func:`download_checkpoint`).

The Hub is treated as unreliable: every upload is retried with exponential backoff and then given up with a warning
on the ``hf_vit.hub`` logger. Nothing here raises into the training loop or writes into ``output_dir``.

Only what the run recorded as its own goes up: the final files named in ``output_dir``'s ownership record
(``.hf_vit_run.json``, :mod:`hf_vit.run_dir`) and ``train_config.yaml``, and of a checkpoint the files its
``manifest.json`` lists. Anything else in the folder (a user's notes, a scan, logs) stays local, whatever its name.
A repository that does not exist yet is created public unless ``private`` (``--hub_private_repo true``, or
``python -m hf_vit.push --private``); an existing one keeps its visibility.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

from huggingface_hub import HfApi, snapshot_download

from hf_vit.errors import UserError, scrub

log = logging.getLogger("hf_vit.hub")

STRATEGIES = ("end", "every_save", "checkpoint")
# The part of a checkpoint that is a usable model (as opposed to optimizer/scheduler/RNG state).
MODEL_FILES = ["*.safetensors", "config.json", "preprocessor_config.json"]
# huggingface_hub's `*` matches across "/", so "*/*" is what keeps an upload to the folder's top level; the other two
# name the folders that must never go up as loose files even if a pattern above is widened.
TOP_LEVEL_ONLY = ["*/*", "checkpoint-*", "*.tmp"]
LAST_CHECKPOINT = "last-checkpoint"
MANIFEST_NAME = "manifest.json"

T = TypeVar("T")


def _error_line(err: Exception, token: str | None) -> str:
    """A Hub error on one line, without the token sent (``token``, else ``HF_TOKEN``) or any other known secret: Hub
    errors can echo request details, and HTTP errors span several lines."""
    return " ".join(scrub(f"{type(err).__name__}: {err}", held=(token, os.environ.get("HF_TOKEN"))).split())


class HubPusher:
    """Uploads one run's ``output_dir`` to one Hub model repo, following ``strategy``.

    ``token`` falls back to ``HF_TOKEN`` and then to the cached ``hf auth login`` (huggingface_hub's own lookup).
    ``hub_model_id`` defaults to ``<your user name>/<basename of output_dir>``; both it and the repo are resolved on
    the first push, so constructing a pusher never touches the network.
    """

    def __init__(
        self,
        output_dir: str,
        hub_model_id: str | None = None,
        private: bool = False,
        strategy: str = "end",
        token: str | None = None,
        api: HfApi | None = None,
        max_retries: int = 3,
        backoff_seconds: float = 2.0,
    ):
        if strategy not in STRATEGIES:
            raise UserError(f"hub_strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.output_dir = Path(output_dir)
        self.hub_model_id = hub_model_id
        self.private = private
        self.strategy = strategy
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.api = api if api is not None else HfApi(token=token)
        self._token = token
        self.repo_id: str | None = None  # resolved on first push
        self.failed_uploads: list[str] = []  # what was given up on, for callers that must report it (hf_vit.push)
        # One worker: pushes go out in order and never compete with each other for bandwidth.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_vit-hub")
        self._lock = threading.Lock()
        self._pending: str | None = None
        self._draining = False
        self._future: Future | None = None
        self._closed = False
        self.last_url: str | None = None  # the commit URL of the last successful upload

    def __repr__(self) -> str:  # written by hand so that the token can never show up in a log or a traceback
        return (
            f"HubPusher(output_dir={str(self.output_dir)!r}, hub_model_id={self.hub_model_id!r}, "
            f"strategy={self.strategy!r})"
        )

    @classmethod
    def from_config(cls, cfg) -> HubPusher | None:
        """Build a pusher from a training config (``push_to_hub``, ``hub_*``, ``output_dir``); None if not pushing."""
        if not cfg.push_to_hub:
            return None
        return cls(
            output_dir=cfg.output_dir,
            hub_model_id=cfg.hub_model_id,
            private=cfg.hub_private_repo,
            strategy=cfg.hub_strategy,
            token=cfg.hub_token,
        )

    def on_save(self, checkpoint_dir: str) -> None:
        """Queue a background push of a just-saved checkpoint; returns at once. No-op for strategy ``end``.

        If uploads are slower than saves, only the newest waiting checkpoint is pushed: an older one is superseded
        and may be deleted by ``save_total_limit`` before its turn.
        """
        if self.strategy == "end":
            return
        with self._lock:
            if self._closed:
                log.warning("Hub push of %s skipped: on_end() was already called", checkpoint_dir)
                return
            self._pending = str(checkpoint_dir)
            if not self._draining:
                self._draining = True
                self._future = self._pool.submit(self._drain)

    def wait(self) -> None:
        """Block until every queued checkpoint push has finished (or been given up)."""
        with self._lock:
            future = self._future
        if future is not None:
            future.result()  # _drain catches everything, so this only waits

    def close(self) -> str | None:
        """Wait for pending checkpoint pushes and stop taking new ones, without pushing the final files; returns
        the last commit URL (None if nothing was pushed)."""
        self.wait()
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)
        return self.last_url

    def on_end(self) -> str | None:
        """Wait for pending pushes, then push the final files of ``output_dir`` (those the run recorded as its own,
        :func:`run_files`).

        Returns the commit URL, or None if the push was given up (a warning says why).
        """
        self.wait()
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)
        files = run_files(self.output_dir)
        if not files:
            log.warning("Nothing to push: %s holds no final files recorded by its run", self.output_dir)
            self.failed_uploads.append("final files")
            return None
        info = self._retry(
            "final files",
            lambda: self.api.upload_folder(
                repo_id=self.repo_id,
                folder_path=self.output_dir,
                allow_patterns=files,
                ignore_patterns=TOP_LEVEL_ONLY,
                commit_message="End of training",
            ),
        )
        if info is None:
            return None
        url = str(getattr(info, "commit_url", info))
        print(f"Pushed {self.output_dir} to the Hub: {url}", flush=True)  # printed, not logged: the user wants the link
        return url

    def _drain(self) -> None:
        while True:
            with self._lock:
                checkpoint_dir, self._pending = self._pending, None
                if checkpoint_dir is None:
                    self._draining = False
                    return
            self._push_checkpoint(Path(checkpoint_dir))

    def _push_checkpoint(self, checkpoint_dir: Path) -> None:
        step = checkpoint_dir.name.removeprefix("checkpoint-")
        listed = checkpoint_files(checkpoint_dir)
        if listed is None:
            log.warning("Hub push of %s skipped: it has no readable manifest.json naming its files", checkpoint_dir)
            self.failed_uploads.append(f"model files of {checkpoint_dir.name}")
            return
        model_files = [f for f in listed if "/" not in f and any(fnmatch.fnmatch(f, p) for p in MODEL_FILES)]
        self._retry(
            f"model files of {checkpoint_dir.name}",
            lambda: self.api.upload_folder(
                repo_id=self.repo_id,
                folder_path=checkpoint_dir,
                allow_patterns=model_files,
                ignore_patterns=TOP_LEVEL_ONLY,
                commit_message=f"Training in progress, step {step}",
            ),
        )
        if self.strategy == "checkpoint":
            self._retry(
                f"{checkpoint_dir.name} as {LAST_CHECKPOINT}/",
                lambda: self.api.upload_folder(
                    repo_id=self.repo_id,
                    folder_path=checkpoint_dir,
                    path_in_repo=LAST_CHECKPOINT,
                    allow_patterns=[*listed, MANIFEST_NAME],
                    # Replace the previous checkpoint wholesale: a stale file beside new ones would corrupt a resume.
                    delete_patterns="*",
                    commit_message=f"Last checkpoint, step {step}",
                ),
            )

    def _ensure_repo(self) -> None:
        # Lazy so that a pusher can be built (and a run started) offline; retried together with the upload it precedes.
        if self.repo_id is not None:
            return
        repo_id = self.hub_model_id or self.output_dir.resolve().name
        if "/" not in repo_id:
            repo_id = f"{self.api.whoami()['name']}/{repo_id}"
        log.info("Hub repo %s: created as %s if it does not exist yet", repo_id,
                 "private" if self.private else "public (pass --hub_private_repo true / --private for a private one)")
        self.api.create_repo(repo_id, private=self.private, exist_ok=True)
        self.repo_id = repo_id

    def _retry(self, what: str, upload: Callable[[], T]) -> T | None:
        """Run ``upload`` after making sure the repo exists; retry with exponential backoff; never raise."""
        for attempt in range(self.max_retries + 1):
            try:
                self._ensure_repo()
                info = upload()
                self.last_url = str(getattr(info, "commit_url", info))
                return info
            except Exception as err:  # any failure of the Hub or the network is worth a retry, none worth a crash
                message = _error_line(err, self._token)
                if attempt == self.max_retries:
                    log.warning("Giving up pushing %s to the Hub after %d attempts: %s", what, attempt + 1, message)
                    self.failed_uploads.append(what)
                    return None
                delay = self.backoff_seconds * 2**attempt
                log.info("Pushing %s to the Hub failed (%s); retrying in %.0fs", what, message, delay)
                time.sleep(delay)
        return None


def run_files(output_dir: str | os.PathLike) -> list[str]:
    """The top-level files of ``output_dir`` a push may publish: the committed final outputs its ownership record
    names, plus ``train_config.yaml`` when the run created it — each only if it is a plain file with the name of a
    final output (:func:`hf_vit.run_dir.ownership.is_final_output`, the one list of them). Empty for a folder hf_vit
    did not write. Everything else in output_dir (logs, caches, checkpoints) stays local."""
    from .config import CONFIG_FILE_NAME
    from .run_dir.ownership import is_final_output, read_record

    out = Path(output_dir)
    try:
        record = read_record(out)
    except UserError:
        return []
    names = [*(n for n in record["final"] if is_final_output(n)),
             *([CONFIG_FILE_NAME] if CONFIG_FILE_NAME in record["created"] else [])]
    return sorted({n for n in names if "/" not in n and (out / n).is_file() and not (out / n).is_symlink()})


def checkpoint_files(checkpoint_dir: str | os.PathLike) -> list[str] | None:
    """The files a checkpoint's ``manifest.json`` lists (relative POSIX paths); None without a readable one."""
    try:
        files = json.loads((Path(checkpoint_dir) / MANIFEST_NAME).read_text())["files"]
        return sorted(str(f) for f in files)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def download_checkpoint(
    repo_id: str,
    token: str | None = None,
    api: HfApi | None = None,
    download: Callable[..., str] | None = None,
) -> str:
    """Download ``last-checkpoint/`` of a Hub repo pushed with ``hub_strategy='checkpoint'``; return its local path.

    ``download`` defaults to ``api.snapshot_download`` when ``api`` is given, else to
    ``huggingface_hub.snapshot_download``; tests pass a fake. Raises :class:`UserError` if the download fails or the
    repo holds no checkpoint.
    """
    if download is None:
        download = api.snapshot_download if api is not None else snapshot_download
    try:
        root = download(repo_id, allow_patterns=[f"{LAST_CHECKPOINT}/*"], token=token)
    except Exception as err:
        message = _error_line(err, token)
        raise UserError(
            f"could not download {LAST_CHECKPOINT}/ from the Hub repo {repo_id!r} ({message}); "
            "check the repo id and your login (hf auth login, or HF_TOKEN)"
        ) from None
    path = Path(root) / LAST_CHECKPOINT
    if not path.is_dir() or not any(path.iterdir()):
        raise UserError(
            f"the Hub repo {repo_id!r} holds no {LAST_CHECKPOINT}/ folder; only runs pushed with "
            "hub_strategy=checkpoint (or hf_vit.push --include_checkpoints) can be resumed from the Hub"
        )
    return str(path)
