"""HubPusher, hf_vit.push and download_checkpoint against a fake Hub: no test here touches the network."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

import hf_vit.hub as hub
from hf_vit import push
from hf_vit.errors import UserError
from hf_vit.checkpoint import complete_checkpoints
from hf_vit.hub import HubPusher, download_checkpoint
from hf_vit.manifest import write_manifest
from hf_vit.run_dir import FinalOutputs, prepare_output_dir, record_created

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_SECRETtokenDoNotLeak1234"
FINAL = {
    "model.safetensors",
    "config.json",
    "preprocessor_config.json",
    "README.md",
    "all_results.json",
    "eval_results.json",
    "train_config.yaml",
    "learning_curve.png",
    "log_history.json",
}
CHECKPOINT = {"model.safetensors", "config.json", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"}


@dataclass
class Upload:
    folder: str  # local folder name, e.g. "checkpoint-20"
    path_in_repo: str
    files: set[str]  # what upload_folder would send, filtered exactly as huggingface_hub filters it
    delete_patterns: str | list[str] | None


class FakeApi:
    """Records what HubPusher asks of the Hub; `fail` makes every upload raise, `before_upload` runs first."""

    def __init__(self, fail: Exception | None = None, before_upload=None):
        self.calls: list[tuple[str, dict]] = []
        self.uploads: list[Upload] = []
        self.fail = fail
        self.before_upload = before_upload

    def whoami(self):
        self.calls.append(("whoami", {}))
        return {"name": "alice"}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None,
                      delete_patterns=None, commit_message=None):
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": str(folder_path)}))
        if self.before_upload:
            self.before_upload(Path(folder_path))
        if self.fail:
            raise self.fail
        local = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        files = filter_repo_objects(local, allow_patterns=allow_patterns,
                                    ignore_patterns=list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS)
        self.uploads.append(Upload(Path(folder_path).name, path_in_repo or "", set(files), delete_patterns))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(self.uploads)}")

    def count(self, name):
        return sum(1 for call, _ in self.calls if call == name)


def finished_run(out: Path, checkpoints=("checkpoint-10", "checkpoint-20", "checkpoint-30.tmp")) -> Path:
    """A run written as a training run writes it: its config and checkpoints (each with its manifest) recorded as
    hf_vit's, a committed set of final outputs; then files that must stay local."""
    with prepare_output_dir(out, overwrite=False, resuming=False):
        record_created(out, "train_config.yaml")
        (out / "train_config.yaml").write_text("seed: 1\n")
        for ckpt in checkpoints:
            record_created(out, ckpt.removesuffix(".tmp"))
            (out / ckpt).mkdir()
            for name in CHECKPOINT:
                (out / ckpt / name).write_bytes(ckpt.encode())
            if not ckpt.endswith(".tmp"):
                write_manifest(out / ckpt)
        with FinalOutputs(out) as staging:
            for name in FINAL - {"train_config.yaml"}:
                (staging / name).write_bytes(b"{}" if name.endswith(".json") else b"\x00\x01data")
    for name in ("events.out.tfevents.1", "train.log", "plots/extra.png"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text("local only")
    return out


@pytest.fixture
def run_dir(tmp_path):
    """A finished run: final files, files that must stay local, two complete checkpoints and one half-written."""
    return finished_run(tmp_path / "vit-run")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pusher(run_dir, api, **kwargs):
    return HubPusher(str(run_dir), hub_model_id="alice/vit-run", api=api, backoff_seconds=0.0, **kwargs)


def test_a_sharded_model_goes_up_with_its_index_and_only_final_output_names_go_up(tmp_path):
    """The files a push publishes are the run's final outputs by the one list (run_dir.ownership.FINAL_OUTPUTS, plus
    the weight shards): a model too large for one file goes up with the index that names its shards."""
    out = tmp_path / "big-run"
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    with prepare_output_dir(out, overwrite=False, resuming=False):
        with FinalOutputs(out) as staging:
            for name in [*shards, "model.safetensors.index.json", "config.json", "all_results.json", "notes.txt"]:
                (staging / name).write_text("{}")
    assert hub.run_files(out) == sorted([*shards, "all_results.json", "config.json", "model.safetensors.index.json"])


def test_end_strategy_pushes_only_final_top_level_files_once(run_dir):
    api = FakeApi()
    p = pusher(run_dir, api, strategy="end")
    p.on_save(str(run_dir / "checkpoint-10"))
    assert api.calls == []  # 'end' ignores saves
    url = p.on_end()
    assert url == "https://huggingface.co/alice/vit-run/commit/1"
    assert [(u.folder, u.path_in_repo, u.files) for u in api.uploads] == [("vit-run", "", FINAL)]


def test_every_save_pushes_model_files_of_each_checkpoint_then_final_files(run_dir):
    api = FakeApi()
    p = pusher(run_dir, api, strategy="every_save")
    for step in (10, 20):
        p.on_save(str(run_dir / f"checkpoint-{step}"))
        p.wait()
    p.on_end()
    assert [(u.folder, u.path_in_repo, u.files) for u in api.uploads] == [
        ("checkpoint-10", "", {"model.safetensors", "config.json"}),
        ("checkpoint-20", "", {"model.safetensors", "config.json"}),
        ("vit-run", "", FINAL),
    ]


def test_checkpoint_strategy_also_replaces_last_checkpoint_folder(run_dir):
    api = FakeApi()
    p = pusher(run_dir, api, strategy="checkpoint")
    p.on_save(str(run_dir / "checkpoint-20"))
    p.on_end()
    assert [(u.folder, u.path_in_repo, u.files) for u in api.uploads] == [
        ("checkpoint-20", "", {"model.safetensors", "config.json"}),
        ("checkpoint-20", "last-checkpoint", CHECKPOINT | {"manifest.json"}),
        ("vit-run", "", FINAL),
    ]
    assert api.uploads[1].delete_patterns == "*"  # no stale file from an older checkpoint survives beside the new one


def test_repo_is_created_lazily_once_with_exist_ok_under_the_user_namespace(run_dir):
    api = FakeApi()
    p = HubPusher(str(run_dir), private=True, strategy="every_save", api=api)
    assert api.calls == []  # building a pusher stays offline
    p.on_save(str(run_dir / "checkpoint-10"))
    p.on_end()
    assert api.count("whoami") == 1
    assert [kw for call, kw in api.calls if call == "create_repo"] == [
        {"repo_id": "alice/vit-run", "private": True, "exist_ok": True}
    ]
    assert {kw["repo_id"] for call, kw in api.calls if call == "upload_folder"} == {"alice/vit-run"}


def test_on_save_returns_while_uploading_and_a_slow_hub_skips_to_the_newest_checkpoint(run_dir):
    started, release = threading.Event(), threading.Event()

    def block_first_upload(folder):
        started.set()
        assert release.wait(timeout=10)

    api = FakeApi(before_upload=block_first_upload)
    record_created(run_dir, "checkpoint-30")
    (run_dir / "checkpoint-30").mkdir()
    (run_dir / "checkpoint-30" / "model.safetensors").write_bytes(b"30")
    write_manifest(run_dir / "checkpoint-30")
    p = pusher(run_dir, api, strategy="every_save")
    p.on_save(str(run_dir / "checkpoint-10"))
    assert started.wait(timeout=10)
    p.on_save(str(run_dir / "checkpoint-20"))  # returns although checkpoint-10 is still uploading
    p.on_save(str(run_dir / "checkpoint-30"))  # supersedes checkpoint-20, which never got its turn
    release.set()
    p.on_end()
    assert [u.folder for u in api.uploads] == ["checkpoint-10", "checkpoint-30", "vit-run"]


def test_failing_hub_is_retried_with_backoff_then_given_up_with_a_warning(run_dir, monkeypatch, caplog):
    sleeps = []
    monkeypatch.setattr(hub.time, "sleep", sleeps.append)
    api = FakeApi(fail=ConnectionError("Hub unreachable"))
    p = HubPusher(str(run_dir), hub_model_id="alice/vit-run", api=api, max_retries=2, backoff_seconds=1.0)
    with caplog.at_level(logging.INFO, logger="hf_vit.hub"):
        assert p.on_end() is None  # does not raise
    assert api.count("upload_folder") == 3  # first try + 2 retries
    assert sleeps == [1.0, 2.0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "hf_vit.hub"
    assert "Hub unreachable" in warnings[0].getMessage()
    assert p.failed_uploads == ["final files"]


def test_background_push_failures_do_not_raise_into_the_training_loop(run_dir, caplog):
    api = FakeApi(fail=OSError("disk quota"))
    p = pusher(run_dir, api, strategy="checkpoint", max_retries=1)
    p.on_save(str(run_dir / "checkpoint-10"))
    assert p.on_end() is None
    assert api.count("upload_folder") == 6  # 3 pushes x 2 attempts
    assert len(p.failed_uploads) == 3


@pytest.mark.parametrize("fail", [None, OSError("connection reset")])
def test_output_dir_is_byte_identical_after_a_push(run_dir, fail):
    before = snapshot(run_dir)
    p = pusher(run_dir, FakeApi(fail=fail), strategy="checkpoint", max_retries=1)
    p.on_save(str(run_dir / "checkpoint-20"))
    p.on_end()
    assert snapshot(run_dir) == before


def test_token_appears_in_no_file_output_or_log_record(run_dir, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # A failure whose message echoes the credential, as a careless HTTP error might.
    api = FakeApi(fail=OSError(f"401 Unauthorized\nAuthorization: Bearer {TOKEN}"))

    def failing_download(repo_id, **kwargs):
        raise api.fail

    with caplog.at_level(logging.DEBUG):
        p = pusher(run_dir, api, strategy="checkpoint", token=TOKEN, max_retries=1)
        p.on_save(str(run_dir / "checkpoint-20"))
        p.on_end()
        with pytest.raises(UserError) as err:
            download_checkpoint("alice/vit-run", token=TOKEN, download=failing_download)
    out, errs = capsys.readouterr()
    assert caplog.records, "the failures should have been logged"
    logged = caplog.text + "".join(r.getMessage() for r in caplog.records)
    for text in (out, errs, logged, repr(p), str(err.value)):
        assert TOKEN not in text
    assert all(TOKEN.encode() not in data for data in snapshot(run_dir).values())


def test_from_config_reads_training_settings():
    cfg = SimpleNamespace(push_to_hub=False, hub_model_id="me/run", hub_private_repo=True, hub_strategy="checkpoint",
                          hub_token=None, output_dir="outputs/run")
    assert HubPusher.from_config(cfg) is None
    cfg.push_to_hub = True
    p = HubPusher.from_config(cfg)
    assert (p.hub_model_id, p.private, p.strategy, p.output_dir) == ("me/run", True, "checkpoint", Path("outputs/run"))
    cfg.hub_strategy = "sometimes"
    with pytest.raises(UserError, match="hub_strategy must be one of"):
        HubPusher.from_config(cfg)


def test_the_pushed_checkpoint_is_the_highest_complete_step(tmp_path):
    assert complete_checkpoints(tmp_path) == []
    for name in ("checkpoint-9", "checkpoint-10", "checkpoint-11.tmp", "checkpoint-x", "checkpoint-12"):
        (tmp_path / name).mkdir()
        if name != "checkpoint-12":  # a folder without its state file is still being written
            (tmp_path / name / "trainer_state.json").write_text("{}")
    assert complete_checkpoints(tmp_path)[-1] == tmp_path / "checkpoint-10"


def test_push_cli_pushes_final_files_and_latest_complete_checkpoint(run_dir, monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    url = push.main([str(run_dir), "--hub_model_id", "alice/vit-run", "--include_checkpoints", "--private"])
    assert url.startswith("https://huggingface.co/alice/vit-run/commit/")
    assert [(u.folder, u.path_in_repo) for u in api.uploads] == [
        ("checkpoint-20", ""), ("checkpoint-20", "last-checkpoint"), ("vit-run", "")
    ]
    assert api.calls[0] == ("create_repo", {"repo_id": "alice/vit-run", "private": True, "exist_ok": True})


def test_push_cli_reports_a_failed_push(run_dir, monkeypatch):
    monkeypatch.setattr(hub, "HfApi", lambda token=None: FakeApi(fail=OSError("down")))
    monkeypatch.setattr(hub.time, "sleep", lambda s: None)
    with pytest.raises(UserError, match="could not push final files"):
        push.main([str(run_dir), "--hub_model_id", "alice/vit-run"])


def test_push_cli_on_a_missing_run_dir_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hf_vit.push", str(tmp_path / "nope"), "--hub_model_id", "alice/x"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]


def test_download_checkpoint_returns_the_local_last_checkpoint(tmp_path):
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        (tmp_path / "snap" / "last-checkpoint").mkdir(parents=True)
        (tmp_path / "snap" / "last-checkpoint" / "model.safetensors").write_bytes(b"w")
        return str(tmp_path / "snap")

    path = download_checkpoint("alice/vit-run", token="t", download=fake_download)
    assert path == str(tmp_path / "snap" / "last-checkpoint")
    assert calls == [("alice/vit-run", {"allow_patterns": ["last-checkpoint/*"], "token": "t"})]


def test_download_checkpoint_fails_with_one_line_when_the_repo_has_no_checkpoint(tmp_path):
    with pytest.raises(UserError, match="holds no last-checkpoint/") as err:
        download_checkpoint("alice/vit-run", download=lambda repo_id, **kw: str(tmp_path))
    assert "\n" not in str(err.value)

    def unreachable(repo_id, **kwargs):
        raise OSError("Repository Not Found\nfor url https://huggingface.co/alice/vit-run")

    with pytest.raises(UserError, match="could not download last-checkpoint/ from the Hub repo 'alice/vit-run'") as err:
        download_checkpoint("alice/vit-run", download=unreachable)
    assert "\n" not in str(err.value)
