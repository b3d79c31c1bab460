"""Reliability (issue 7): a run killed, preempted or fed bad input loses nothing.

* SIGKILL at random steps and resume with ``latest`` -> the same final weights bit for bit as an uninterrupted run, for
  map-style and streaming data (a short benchmarks/fault_inject.py; the long one is marked slow).
* A kill during a checkpoint save leaves the previous checkpoint usable, and ``latest`` ignores the partial one.
* SIGTERM to the whole process group (what SLURM does) -> exit 0 within 60 s with a checkpoint; resuming continues.
* Non-finite losses and gradients are skipped and counted; a streak of ``max_nonfinite_steps`` stops the run with
  exit 2, and the last good checkpoint survives.
* Every row of the bad-input table (README) -> one ``error:`` line, exit 2, no traceback, output_dir untouched.
* Security: weights only from safetensors, training state with ``weights_only=True``, the Hub token in no file or log.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_vit.checkpoint as ckpt
import run_finetune
from conftest import CIFAR10, TINY_ARGS
from hf_vit.errors import run_cli

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fault_inject", REPO / "benchmarks" / "fault_inject.py")
fault_inject = importlib.util.module_from_spec(_spec)
# fault_inject trains on HF_VIT_SHARED_DATASETS/cifar10, read when it is imported: the folder this session's CIFAR-10
# lies in (the shared copy, or conftest's generated stand-in).
with mock.patch.dict(os.environ, {"HF_VIT_SHARED_DATASETS": str(CIFAR10.parent)}):
    _spec.loader.exec_module(fault_inject)

SECRET = "hf_SECRET123reliabilityToken"


# ------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def references(tmp_path_factory, cifar10_path):
    """Uninterrupted reference runs of benchmarks/fault_inject.py's configuration, map-style and streaming (trained
    concurrently)."""
    assert fault_inject.CIFAR10 == cifar10_path
    workdir = tmp_path_factory.mktemp("references")
    launches = {mode: fault_inject.Launch(fault_inject.train_command(mode, workdir / f"{mode}-reference"),
                                          workdir / f"{mode}-reference.log") for mode in ("map", "streaming")}
    for mode, launch in launches.items():
        assert launch.wait() == 0, f"{mode} reference failed:\n{launch.output()[-3000:]}"
    return {mode: workdir / f"{mode}-reference" for mode in launches}


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its size, mtime and content hash: equal snapshots = nothing changed."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir():
            out[rel] = "dir"
        else:
            st = path.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def run_in_process(argv: list[str]) -> tuple[int | None, str]:
    """``run_finetune.py argv`` through the real entry wrapper, in this process; returns (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            run_cli(run_finetune.main, argv)
        except SystemExit as exit_:
            return exit_.code, err.getvalue()
    return None, err.getvalue()


def without_flags(args: list[str], flags: list[str]) -> list[str]:
    """``args`` minus each ``--flag value`` pair named in ``flags``."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        else:
            out.append(arg)
    return out


def assert_one_line_error(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    for word in words:
        assert word in errors[0], errors[0]


# ------------------------------------------------------------------------------------------------ kill and resume
def test_sigkill_at_random_steps_then_resume_gives_identical_weights_map_and_streaming(references, tmp_path):
    """The CI variant of benchmarks/fault_inject.py: one killed-and-resumed run per mode (2 cycles in all)."""
    rng = random.Random(9)  # kills at steps 15 (map, 2nd epoch) and 9 (streaming, 1st epoch)
    for mode in ("map", "streaming"):
        summary = fault_inject.run_mode(mode, cycles=1, kills_per_cycle=1, workdir=tmp_path, rng=rng,
                                        reference_dir=references[mode])
        run = summary["runs"][0]
        assert len(run["kills"]) == 1 and run["launches"] == 2, run
        assert 0 < run["kills"][0]["seen_step"] < fault_inject.TOTAL_STEPS, run  # the kill landed mid-run
        assert summary["identical"] == 1, run["differences"]


def test_compare_detects_a_one_ulp_difference(references):
    """The comparison the proof rests on is exact: one weight nudged by one ulp is a difference."""
    state = fault_inject.final_state(references["map"])
    name = next(iter(state["final_model"]))
    nudged_tensor = state["final_model"][name].clone()
    nudged_tensor.view(-1)[0] = torch.nextafter(nudged_tensor.view(-1)[0], torch.tensor(math.inf))
    nudged = {**state, "final_model": {**state["final_model"], name: nudged_tensor}}
    assert fault_inject.compare(state, state) == []
    diffs = fault_inject.compare(state, nudged)
    assert len(diffs) == 1 and diffs[0].startswith(f"final_model: 1/{len(state['final_model'])} tensors differ"), diffs


@pytest.mark.slow
def test_fault_injection_long(tmp_path):
    """The documented run: 5 cycles x 2 SIGKILLs per mode (docs/reliability.md records its result)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fault_inject.py"), "--cycles", "5",
                           "--mode", "both", "--workdir", str(tmp_path)], capture_output=True, text=True,
                          timeout=7200)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout
    assert all(s["identical"] == s["cycles"] == 5 for s in summary.values()), summary


# ------------------------------------------------------------------------------------------- kill during a save
KILL_IN_SAVE = """
import os, signal, sys
import hf_vit.checkpoint as ckpt
import run_finetune
finalize = ckpt.finalize
def finalize_or_die(tmp_dir, state):
    # accelerate's save_state has written model, optimizer and RNG files into the .tmp folder; die before it is done.
    if tmp_dir.name == "checkpoint-{step}.tmp":
        os.kill(os.getpid(), signal.SIGKILL)
    return finalize(tmp_dir, state)
ckpt.finalize = finalize_or_die
run_finetune.main(sys.argv[1:])
"""


def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_resume_is_exact(references, tmp_path):
    out = tmp_path / "run"
    cmd = fault_inject.train_command("map", out)
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SAVE.format(step=6), *cmd[2:]], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = out / "checkpoint-6.tmp"
    assert (partial / "model.safetensors").is_file() and not (partial / ckpt.STATE_FILE).exists()
    assert [p.name for p in ckpt.complete_checkpoints(str(out))] == ["checkpoint-3"]
    assert ckpt.resolve_resume_path("latest", str(out)) == str(out / "checkpoint-3")

    resumed = fault_inject.Launch([*cmd, "--resume_from_checkpoint", "latest"], tmp_path / "resume.log")
    assert resumed.wait() == 0, resumed.output()[-3000:]
    assert "Resumed from" in resumed.output() and "checkpoint-3 at step 3" in resumed.output()
    assert not list(out.glob("*.tmp")), "the stale partial save was not cleaned up"
    assert fault_inject.compare(fault_inject.final_state(references["map"]), fault_inject.final_state(out)) == []


def _fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}{'' if complete else '.tmp'}"
    path.mkdir(parents=True)
    save_file({"w": torch.full((4,), float(step))}, str(path / "model.safetensors"))
    (path / "optimizer.bin").write_bytes(b"state")
    (path / "random_states_0.pkl").write_bytes(b"rng")
    if complete:
        (path / ckpt.STATE_FILE).write_text(json.dumps({"global_step": step}))
    return path


def test_latest_ignores_partial_and_tmp_folders_even_with_a_state_file(tmp_path):
    _fake_checkpoint(tmp_path, 3)
    _fake_checkpoint(tmp_path, 6, complete=False)
    # Killed after writing trainer_state.json but before the rename: still a .tmp name, so still not a checkpoint.
    late = _fake_checkpoint(tmp_path, 9, complete=False)
    (late / ckpt.STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # a folder with the right name but no state file
    assert ckpt.resolve_resume_path("latest", str(tmp_path)) == str(tmp_path / "checkpoint-3")


def test_finalize_killed_before_the_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    _fake_checkpoint(tmp_path, 3)
    tmp = _fake_checkpoint(tmp_path, 6, complete=False)

    def die(*args):
        raise KeyboardInterrupt("simulated kill at the rename")

    monkeypatch.setattr(ckpt.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        ckpt.finalize(tmp, {"global_step": 6})
    monkeypatch.undo()
    assert ckpt.resolve_resume_path("latest", str(tmp_path)) == str(tmp_path / "checkpoint-3")
    ckpt.finalize(tmp, {"global_step": 6})  # the retry succeeds
    assert ckpt.resolve_resume_path("latest", str(tmp_path)) == str(tmp_path / "checkpoint-6")
    assert json.loads((tmp_path / "checkpoint-6" / ckpt.STATE_FILE).read_text()) == {"global_step": 6}


def test_rotation_killed_mid_delete_never_leaves_a_half_checkpoint(tmp_path, monkeypatch):
    for step in (3, 6, 9):
        _fake_checkpoint(tmp_path, step)
    real_rmtree = shutil.rmtree

    def die_half_way(path, ignore_errors=False):
        path = Path(path)
        if path.name.startswith("checkpoint-3"):
            (path / "model.safetensors").unlink()  # part of the folder is gone ...
            raise KeyboardInterrupt("simulated kill while deleting")  # ... when the kill lands
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.shutil, "rmtree", die_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.rotate(str(tmp_path), limit=2)
    monkeypatch.undo()
    # Whatever was half deleted is no longer named like a checkpoint, and every checkpoint left is whole.
    for path in ckpt.complete_checkpoints(str(tmp_path)):
        assert (path / "model.safetensors").is_file(), path
    assert [p.name for p in ckpt.complete_checkpoints(str(tmp_path))] == ["checkpoint-6", "checkpoint-9"]
    ckpt.rotate(str(tmp_path), limit=2)  # the next save's rotation clears the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-9"]


def test_rotation_counts_only_complete_checkpoints(tmp_path):
    for step in (3, 6):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 9, complete=False)  # a save in progress does not make checkpoint-3 redundant
    ckpt.rotate(str(tmp_path), limit=2)
    assert [p.name for p in ckpt.complete_checkpoints(str(tmp_path))] == ["checkpoint-3", "checkpoint-6"]


def test_finalize_replacing_a_same_step_checkpoint_is_atomic(tmp_path, monkeypatch):
    _fake_checkpoint(tmp_path, 6)
    tmp = _fake_checkpoint(tmp_path, 6, complete=False)
    save_file({"w": torch.full((4,), 60.0)}, str(tmp / "model.safetensors"))
    real_replace, calls = os.replace, []

    def die_after_moving_the_old_one_aside(src, dst):
        real_replace(src, dst)
        if Path(dst).name.startswith("checkpoint-"):  # the renames of folders (not the manifest's atomic write)
            calls.append(Path(dst).name)
            if len(calls) == 1:
                raise KeyboardInterrupt("simulated kill between the two renames")

    monkeypatch.setattr(ckpt.os, "replace", die_after_moving_the_old_one_aside)
    with pytest.raises(KeyboardInterrupt):
        ckpt.finalize(tmp, {"global_step": 6})
    monkeypatch.undo()
    assert calls == ["checkpoint-6.deleting.tmp"]
    assert ckpt.complete_checkpoints(str(tmp_path)) == []  # nothing half-written carries a checkpoint name
    ckpt.finalize(tmp, {"global_step": 6})
    assert load_file(str(tmp_path / "checkpoint-6" / "model.safetensors"))["w"][0] == 60.0


# ----------------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_to_the_process_group_saves_exits_0_within_60s_and_resume_is_exact(references, tmp_path):
    """SLURM signals every process of the step (the loader workers too); Kubernetes signals PID 1. Either way: finish
    the step, save, exit 0. Run with a Hub token and the tensorboard tracker: the token must reach no file or log."""
    out = tmp_path / "run"
    cmd = [*fault_inject.train_command("map", out), "--hub_token", SECRET, "--report_to", "tensorboard"]
    launch = fault_inject.Launch(cmd, tmp_path / "first.log", new_session=True)
    deadline = time.time() + 600
    while launch.step < 5 and launch.proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert launch.proc.poll() is None, launch.output()[-3000:]
    os.killpg(launch.proc.pid, signal.SIGTERM)
    signalled = time.time()
    rc = launch.wait(timeout=120)
    took = time.time() - signalled
    assert rc == 0, launch.output()[-3000:]
    assert took < 60, f"exit took {took:.1f} s"
    message = next(line for line in launch.lines if line.startswith("Preempted: checkpoint saved at step "))
    step = int(message.split("step ")[1].split()[0])
    assert 5 <= step < fault_inject.TOTAL_STEPS
    assert ckpt.resolve_resume_path("latest", str(out)) == str(out / f"checkpoint-{step}")
    assert not (out / "model.safetensors").exists()  # preempted, not finished

    resumed = fault_inject.Launch([*cmd, "--resume_from_checkpoint", "latest"], tmp_path / "resume.log")
    assert resumed.wait() == 0, resumed.output()[-3000:]
    assert f"checkpoint-{step} at step {step}" in resumed.output()
    assert fault_inject.compare(fault_inject.final_state(references["map"]), fault_inject.final_state(out)) == []

    # The token is in no output file (configs, checkpoints, tracker events, model card) and in no log line.
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == [], leaks
    assert any(out.rglob("events.out.tfevents*")), "the tracker wrote nothing, so the check above covers nothing"


def test_sighup_to_the_process_group_is_a_preemption_and_releases_the_lock(tmp_path):
    """A closed terminal (an ssh session dropped) sends SIGHUP to the whole foreground group, loader workers
    included: the run finishes its step, saves a checkpoint, releases its lock and exits 0, as for SIGTERM."""
    out = tmp_path / "run"
    launch = fault_inject.Launch(fault_inject.train_command("map", out), tmp_path / "first.log", new_session=True)
    deadline = time.time() + 600
    while launch.step < 3 and launch.proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert launch.proc.poll() is None, launch.output()[-3000:]
    os.killpg(launch.proc.pid, signal.SIGHUP)
    assert launch.wait(timeout=120) == 0, launch.output()[-3000:]
    message = next(line for line in launch.lines if line.startswith("Preempted: checkpoint saved at step "))
    step = int(message.split("step ")[1].split()[0])
    assert ckpt.resolve_resume_path("latest", str(out)) == str(out / f"checkpoint-{step}")
    assert not (out / ".hf_vit_run.lock").exists()


# ----------------------------------------------------------------------------------------------- non-finite guard
class _InfGradient(torch.autograd.Function):
    """Identity forward (a finite loss), infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def test_nonfinite_steps_are_skipped_counted_and_a_streak_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                              cifar10_path):
    """Step 3 gets an infinite gradient (finite loss), step 5 a NaN loss: both skipped and counted, training goes on.
    From step 8 on every loss is NaN: 5 in a row stop the run at step 12 with exit 2; checkpoints are every 2 steps,
    none is written inside the streak, so checkpoint-6 (the last good one) survives rotation."""
    import hf_vit.trainer as trainer

    real_loss, calls = trainer.classification_loss, []

    def faulty_loss(logits, targets, smoothing):
        calls.append(1)
        loss = real_loss(logits, targets, smoothing)
        step = len(calls)  # one micro-batch per step
        if step == 3:
            return _InfGradient.apply(loss)
        if step == 5 or step >= 8:
            return loss * math.nan
        return loss

    monkeypatch.setattr(trainer, "classification_loss", faulty_loss)
    out = tmp_path / "run"
    code, stderr = run_in_process([*TINY_ARGS, "--output_dir", str(out), "--checkpointing_steps", "2",
                                   "--max_nonfinite_steps", "5", "--logging_steps", "1"])
    assert code == 2
    assert_one_line_error(stderr, "5 non-finite losses or gradients in a row (steps 8-12)",
                          f"the last good checkpoint is {out / 'checkpoint-6'}")
    assert [p.name for p in ckpt.complete_checkpoints(str(out))] == ["checkpoint-4", "checkpoint-6"]
    state = ckpt.read_state(str(out / "checkpoint-6"))
    assert state["nonfinite_steps"] == 2 and state["nonfinite_in_a_row"] == 0
    weights = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "all_results.json").exists()


def test_a_diverging_learning_rate_stops_with_exit_2(tmp_path, cifar10_path):
    """A real input, no patching: learning_rate 1e6 blows the weights up after one update and every loss is NaN."""
    out = tmp_path / "run"
    code, stderr = run_in_process([*TINY_ARGS, "--output_dir", str(out), "--learning_rate", "1e6",
                                   "--warmup_epochs", "0", "--max_nonfinite_steps", "3", "--checkpointing_steps", "no"])
    assert code == 2
    assert_one_line_error(stderr, "3 non-finite losses or gradients in a row",
                          "the last good checkpoint is none")


# ------------------------------------------------------------------------------------------------ bad input table
@pytest.fixture(scope="module")
def previous_run(references, tmp_path_factory):
    """A finished run (with checkpoints) that bad input must leave exactly as it is."""
    folder = tmp_path_factory.mktemp("previous") / "run"
    shutil.copytree(references["map"], folder)
    return folder


@pytest.fixture(scope="module")
def bad_checkpoints(references, tmp_path_factory):
    """Model folders and checkpoints that must be refused."""
    root = tmp_path_factory.mktemp("bad_checkpoints")
    ref = references["map"]
    model_files = ["config.json", "model.safetensors", "preprocessor_config.json"]

    def model_copy(name: str) -> Path:
        folder = root / name
        folder.mkdir()
        for f in model_files:
            shutil.copy(ref / f, folder / f)
        return folder

    wrong_shapes = model_copy("wrong_shapes")  # config says MLP 96 wide, the weights are 128 wide
    config = json.loads((wrong_shapes / "config.json").read_text())
    (wrong_shapes / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    corrupt = model_copy("corrupt")
    (corrupt / "model.safetensors").write_bytes((ref / "model.safetensors").read_bytes()[:300])
    pickle_only = model_copy("pickle_only")  # weights only in a pickle: never loaded
    torch.save(load_file(str(pickle_only / "model.safetensors")), pickle_only / "pytorch_model.bin")
    (pickle_only / "model.safetensors").unlink()
    newest = ckpt.complete_checkpoints(str(ref))[-1]
    incomplete = root / "incomplete" / newest.name
    shutil.copytree(newest, incomplete)
    (incomplete / "random_states_0.pkl").unlink()
    (root / "empty").mkdir()
    return {"wrong_shapes": wrong_shapes, "corrupt": corrupt, "pickle_only": pickle_only, "checkpoint": newest,
            "incomplete": incomplete, "empty": root / "empty", "root": root}


BAD_INPUT = {
    # row id: (extra flags, words the error line must contain); {ckpt:...} refers to bad_checkpoints.
    "unknown preset": (["--model_preset", "vit_huge_cifar"], ["unknown model_preset 'vit_huge_cifar'", "choose one"]),
    # (argparse accepts a unique prefix of a flag, so the typo must not be one)
    "unknown flag": (["--learning_rte", "1e-3"], ["unknown argument", "--learning_rte", "--help"]),
    "unknown recipe key": (["--config", "{recipe}"], ["unknown config key", "lerning_rate"]),
    "hidden_size not divisible by heads": (["--num_attention_heads", "3"],
                                           ["hidden_size=64 is not divisible by num_attention_heads=3"]),
    "image_size not divisible by patch": (["--patch_size", "5"], ["image_size=32 is not divisible by patch_size=5"]),
    "dataset path missing": (["--dataset_name", "/nonexistent/cifar10"], ["dataset path", "does not exist"]),
    "missing split": (["--eval_split", "nope"], ["split 'nope' not found", "['train']", "--eval_split"]),
    "missing label column": (["--label_column_name", "nope"], ["label column 'nope' not found",
                                                                "--label_column_name"]),
    "global batch not divisible": (["--total_train_batch_size", "33", "--gradient_accumulation_steps", "2"],
                                   ["total_train_batch_size=33 is not divisible", "1 x 2"]),
    "warmup >= epochs": (["--warmup_epochs", "2"], ["warmup_epochs=2.0", "smaller than num_train_epochs=2.0"]),
    "zero learning rate": (["--learning_rate", "0"], ["learning_rate must be positive"]),
    "remote code asked for": (["--trust_remote_code", "true"], ["trust_remote_code=true is not supported",
                                                                "leave it off"]),
    "negative learning rate": (["--learning_rate", "-0.001"], ["learning_rate must be positive"]),
    "train_fraction 0": (["--train_fraction", "0"], ["train_fraction must be in (0, 1]"]),
    "train_fraction above 1": (["--train_fraction", "1.5"], ["train_fraction must be in (0, 1]"]),
    "checkpoint vs width override": (["--model_name_or_path", "{ref}", "--hidden_size", "96"],
                                     ["hidden_size=96 does not fit the checkpoint"]),
    "checkpoint tensors of the wrong shape": (["--model_name_or_path", "{wrong_shapes}"],
                                              ["does not fit the model", "re-initialised"]),
    "corrupt safetensors": (["--model_name_or_path", "{corrupt}"], ["cannot load weights"]),
    "weights only as a pickle": (["--model_name_or_path", "{pickle_only}"], ["cannot load weights"]),
    "resume into a narrower model": (["--resume_from_checkpoint", "{checkpoint}", "--hidden_size", "32"],
                                     ["does not fit this run", "resume with the model"]),
    "resume from an incomplete checkpoint": (["--resume_from_checkpoint", "{incomplete}"],
                                             ["is missing random_states_0.pkl", "manifest"]),
    "resume path holds no checkpoint": (["--resume_from_checkpoint", "{empty}"], ["holds no checkpoint"]),
    "resume path does not exist": (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], ["does not exist"]),
}


@pytest.mark.parametrize("row", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_leaves_output_dir_untouched(row, previous_run, bad_checkpoints, references,
                                                                      tmp_path):
    extra, words = BAD_INPUT[row]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lerning_rate: 0.001\n")
    paths = {k: str(v) for k, v in bad_checkpoints.items()} | {"ref": str(references["map"]), "recipe": str(recipe)}
    extra = [a.format(**paths) for a in extra]
    before = snapshot(previous_run)
    # fault_inject's configuration (the one previous_run was trained with), written over the previous run with
    # overwrite allowed: the error must still come before anything is written.
    args = fault_inject.train_command("map", previous_run)[2:]
    if "--model_name_or_path" in extra:  # the architecture comes from the checkpoint: drop the preset's flags
        args = without_flags(args, ["--model_preset", "--hidden_size", "--intermediate_size", "--num_hidden_layers",
                                    "--num_attention_heads"])
    args += ["--overwrite_output_dir", "true", *extra]
    code, stderr = run_in_process(args)
    assert code == 2, stderr
    assert_one_line_error(stderr, *words)
    assert snapshot(previous_run) == before


def test_output_dir_of_another_run_is_refused_unless_overwrite_or_resume(previous_run):
    before = snapshot(previous_run)
    code, stderr = run_in_process([*TINY_ARGS, "--output_dir", str(previous_run)])
    assert code == 2
    assert_one_line_error(stderr, "already holds a run", "--overwrite_output_dir", "--resume_from_checkpoint latest")
    assert snapshot(previous_run) == before


def test_bad_input_through_the_real_script_exit_2_no_traceback(previous_run, tmp_path):
    before = snapshot(previous_run)
    proc = subprocess.run([sys.executable, str(REPO / "run_finetune.py"), *TINY_ARGS, "--output_dir",
                           str(previous_run), "--overwrite_output_dir", "true", "--eval_split", "nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "split 'nope' not found")
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert snapshot(previous_run) == before


# ------------------------------------------------------------------------------------------------------ security
def test_training_state_loads_with_weights_only_and_weights_from_safetensors(references, tmp_path, monkeypatch):
    """Resume in-process and record every torch.load: all must be weights_only=True, and no model weights may come
    from a pickle."""
    loads = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        loads.append((Path(str(f)).name, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    out = tmp_path / "run"
    shutil.copytree(references["map"], out)
    newest = ckpt.complete_checkpoints(str(out))[-1]
    # Resume from the newest checkpoint and train the single remaining step.
    code, stderr = run_in_process([*fault_inject.train_command("map", out)[2:], "--resume_from_checkpoint",
                                   str(newest)])
    assert code is None, stderr
    names = {name for name, _ in loads}
    assert {"optimizer.bin", "random_states_0.pkl"} <= names, loads
    assert all(weights_only is True for _, weights_only in loads), loads
    assert not any(name.endswith((".bin", ".pt", ".pth")) and "model" in name for name in names), loads


def test_fine_tuning_loads_safetensors_without_remote_code(references, monkeypatch, cifar10_path):
    """Building the model from a checkpoint and loading the dataset never pass trust_remote_code (the user did not ask),
    and the weights are requested as safetensors only."""
    import datasets
    from transformers import ViTForImageClassification

    import hf_vit.data as data
    import hf_vit.models as models
    from hf_vit.config import parse_config

    calls = []

    def recording(name, real):
        def wrapper(*args, **kwargs):
            calls.append((name, kwargs))
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ViTForImageClassification, "from_pretrained",
                        recording("model", ViTForImageClassification.from_pretrained))
    monkeypatch.setattr(datasets, "load_dataset", recording("dataset", datasets.load_dataset))
    cfg = parse_config([*TINY_ARGS, "--model_name_or_path", str(references["map"])])
    assert cfg.model.trust_remote_code is False
    splits = data.load_splits(cfg.data)
    models.build_model(cfg.model, splits.label_names)
    assert {name for name, _ in calls} == {"model", "dataset"}
    assert all(not kwargs.get("trust_remote_code") for _, kwargs in calls), calls
    assert all(kwargs.get("use_safetensors") is True for name, kwargs in calls if name == "model"), calls
