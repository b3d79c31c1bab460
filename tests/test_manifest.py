"""Checkpoint manifests: every file of a checkpoint is the one saved, or the resume is refused with one line."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_vit import manifest
from hf_vit.errors import UserError
from hf_vit.manifest import MANIFEST, verify_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A checkpoint laid out like accelerate's save_state plus ours, with a nested shard folder, and its manifest."""
    folder = tmp_path / "checkpoint-6"
    folder.mkdir()
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(folder / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.ones(100)}}}, folder / "optimizer.bin")
    for rank in range(2):
        with open(folder / f"random_states_{rank}.pkl", "wb") as f:
            pickle.dump({"random_state": [rank] * 50, "torch": torch.get_rng_state()}, f)
    (folder / "pytorch_model_fsdp_0").mkdir()
    (folder / "pytorch_model_fsdp_0" / "shard.bin").write_bytes(bytes(range(256)) * 20)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    write_manifest(folder)
    return folder


def refusal(folder: Path) -> str:
    with pytest.raises(UserError) as err:
        verify_manifest(folder)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_the_manifest_lists_every_file_but_itself_with_size_and_sha256(checkpoint):
    listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert sorted(listed) == ["model.safetensors", "optimizer.bin", "pytorch_model_fsdp_0/shard.bin",
                              "random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"]
    for rel, entry in listed.items():
        data = (checkpoint / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    verify_manifest(checkpoint)


def test_a_truncated_file_is_refused_naming_it(checkpoint):
    path = checkpoint / "random_states_1.pkl"
    path.write_bytes(path.read_bytes()[:-7])
    message = refusal(checkpoint)
    assert "random_states_1.pkl is truncated" in message and "resume from another checkpoint" in message


def test_a_replaced_file_of_the_same_size_is_refused_naming_it(checkpoint):
    path = checkpoint / "random_states_0.pkl"
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))
    assert "random_states_0.pkl was altered" in refusal(checkpoint)


def test_a_grown_file_is_refused_as_altered(checkpoint):
    with open(checkpoint / "optimizer.bin", "ab") as f:
        f.write(b"x")
    assert "optimizer.bin is altered" in refusal(checkpoint)


def test_a_deleted_file_is_refused_naming_it(checkpoint):
    (checkpoint / "pytorch_model_fsdp_0" / "shard.bin").unlink()
    assert "missing pytorch_model_fsdp_0/shard.bin" in refusal(checkpoint)


def test_an_extra_file_is_refused_naming_it(checkpoint):
    (checkpoint / "random_states_2.pkl").write_bytes(b"planted")
    assert "holds random_states_2.pkl, which its manifest.json does not list" in refusal(checkpoint)


def test_a_checkpoint_without_a_manifest_is_refused_with_the_way_forward(checkpoint):
    (checkpoint / MANIFEST).unlink()
    message = refusal(checkpoint)
    assert "has no manifest.json" in message and "resume from another checkpoint" in message
    assert f"python -m hf_vit.manifest write {checkpoint}" in message


@pytest.mark.parametrize("text", ["{", "[]", '{"format": 1, "files": {"a": {"size": "1"}}}',
                                  '{"format": 99, "files": {}}'])
def test_an_unreadable_manifest_is_refused(checkpoint, text):
    (checkpoint / MANIFEST).write_text(text)
    assert "unreadable manifest.json" in refusal(checkpoint)


def test_sizes_are_checked_before_any_file_is_hashed(checkpoint, monkeypatch):
    path = checkpoint / "trainer_state.json"
    path.write_text(path.read_text()[:-1])

    def no_hashing(path):
        raise AssertionError(f"{path} was read before the sizes were checked")

    monkeypatch.setattr(manifest, "_sha256", no_hashing)
    assert "trainer_state.json is truncated" in refusal(checkpoint)


def test_hashing_streams_in_chunks_and_matches_a_whole_file_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "_CHUNK", 4096)
    data = bytes(range(256)) * 100 + b"tail"  # several chunks and a partial one
    (tmp_path / "blob.bin").write_bytes(data)
    assert manifest._sha256(tmp_path / "blob.bin") == (len(data), hashlib.sha256(data).hexdigest())


def test_the_command_line_writes_verifies_and_refuses_in_one_line(checkpoint):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hf_vit.manifest", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120, check=False)

    (checkpoint / MANIFEST).unlink()
    assert cli("write", str(checkpoint)).returncode == 0
    ok = cli("verify", str(checkpoint))
    assert ok.returncode == 0 and "all 6 files match" in ok.stdout
    again = cli("write", str(checkpoint))
    assert again.returncode == 2 and "already has a manifest.json" in again.stderr
    (checkpoint / "model.safetensors").write_bytes(b"")
    bad = cli("verify", str(checkpoint))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "model.safetensors is truncated" in bad.stderr
