"""Distributed training (issue 8), proved with real processes: ``accelerate launch`` with 2 CPU processes (gloo).

Each run is made once per module and shared by the assertions:

* the same fine-tuning run (CIFAR-10, tiny ViT, 20 steps) on 1 process and on 2 processes — the 2-process one
  under a write auditor (``tests/dist_hooks/sitecustomize.py``) that logs every Python-level write per rank and makes
  rank 1 late at each checkpoint;
* a pretraining run (``run_pretrain.py``, streamed ImageNet sample, random-resized crops, 2 loader workers and 2
  accumulation micro-batches per process);
* ``tests/dist_probe.py`` under 2 processes x 2 loader workers: the keys every rank's real loader yields in an epoch,
  for map-style and streaming data, built by the trainer's own ``Run``.
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from conftest import CIFAR10, IMAGENET_SAMPLE, REPO, TINY_ARGS, run_script
from hf_vit.optim import lr_at

# 320 train examples, global batch 32, 2 epochs: 10 optimizer steps per epoch on any number of processes.
FINETUNE = [*TINY_ARGS, "--max_train_samples", "320", "--total_train_batch_size", "32", "--num_train_epochs", "2",
            "--warmup_epochs", "0.5", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--per_device_eval_batch_size", "24", "--report_to", "tensorboard"]
FINETUNE_STEPS, FINETUNE_WARMUP = 20, 5
# The pretraining path: streamed ImageNet photos, random-resized crops (no --crop_padding), a tiny ViT at 32 px. No
# validation carve-out: eval under 2 processes is proved on CIFAR-10 (and a 1000-class confusion plot is slow).
# 256 examples, global batch 32 = 8 per process x 2 processes x 2 accumulation: 8 steps, one epoch.
PRETRAIN = ["--dataset_name", str(IMAGENET_SAMPLE), "--streaming", "true", "--image_size", "32", "--patch_size", "8",
            "--hidden_size", "64", "--intermediate_size", "128", "--num_hidden_layers", "2", "--num_attention_heads",
            "2", "--max_train_samples", "256", "--total_train_batch_size", "32", "--gradient_accumulation_steps", "2",
            "--num_train_epochs", "1", "--warmup_epochs", "0.25", "--learning_rate", "1e-3",
            "--dataloader_num_workers", "2", "--train_val_split", "0", "--logging_steps", "1", "--report_to", "none"]
PRETRAIN_STEPS, PRETRAIN_WARMUP = 8, 2
LATE_RANK_SECONDS = 1  # how late rank 1 arrives at every checkpoint in the 2-process run
TIMEOUT = 300  # a rank stuck in a collective would hold the whole launch past this


def read_json(path: Path):
    return json.loads(path.read_text())


def listing(root: Path) -> set[str]:
    """Every file under root, relative; the tensorboard run folder (a start time) and event file suffix (host, time,
    pid) are blanked out."""
    def blank(part: str) -> str:
        if part.startswith("events.out.tfevents."):
            return "events.out.tfevents.*"
        return "*" if re.fullmatch(r"\d+\.\d+", part) else part

    return {"/".join(blank(part) for part in path.relative_to(root).parts)
            for path in root.rglob("*") if path.is_file()}


def expected_lrs(total: int, warmup: int) -> list[float]:
    """The LR logged after each optimizer step s: the schedule evaluated once per step, at s."""
    return [lr_at(s, total, warmup, 1e-3, 1e-6, 1e-6) for s in range(1, total + 1)]


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory, cifar10_path) -> Path:
    out = tmp_path_factory.mktemp("dist") / "one"
    run_script(["run_finetune.py", *FINETUNE, "--output_dir", str(out)], timeout=TIMEOUT)
    return out


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory, cifar10_path) -> tuple[Path, dict[int, list[dict]]]:
    """The 2-process run and its audit log, ``{rank: [write event, ...]}``."""
    base = tmp_path_factory.mktemp("dist")
    out, log = base / "two", base / "audit"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "dist_hooks"),
                                                        os.environ.get("PYTHONPATH")])),
           "HF_VIT_AUDIT_ROOT": str(out), "HF_VIT_AUDIT_LOG": str(log),
           "HF_VIT_AUDIT_DELAY_RANK1": str(LATE_RANK_SECONDS)}
    run_script(["run_finetune.py", *FINETUNE, "--output_dir", str(out)], nproc=2, env=env, timeout=TIMEOUT)
    events = {rank: [json.loads(line) for line in (log / f"rank{rank}.jsonl").read_text().splitlines()]
              for rank in (0, 1)}
    return out, events


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory, imagenet_sample_path) -> Path:
    out = tmp_path_factory.mktemp("dist") / "pretrain"
    run_script(["run_pretrain.py", *PRETRAIN, "--output_dir", str(out)], nproc=2, timeout=TIMEOUT)
    return out


@pytest.fixture(scope="module")
def probe(tmp_path_factory, cifar10_path, imagenet_sample_path) -> Path:
    base = tmp_path_factory.mktemp("probe")
    run_script(["tests/dist_probe.py", str(base),
                "map", "--", *FINETUNE, "--dataloader_num_workers", "2", "--output_dir", str(base / "map"), "::",
                "stream", "--", *PRETRAIN, "--output_dir", str(base / "stream")], nproc=2, timeout=TIMEOUT)
    return base


# --------------------------------------------------------------------------- the same optimisation on 1 or 2 processes
def test_two_processes_take_the_same_steps_at_the_same_learning_rates_as_one(one_proc, two_proc):
    results = {n: read_json(d / "all_results.json") for n, d in (("one", one_proc), ("two", two_proc[0]))}
    logs = {n: [r for r in read_json(d / "log_history.json") if "learning_rate" in r]
            for n, d in (("one", one_proc), ("two", two_proc[0]))}
    for name in ("one", "two"):
        assert results[name]["global_step"] == FINETUNE_STEPS
        assert results[name]["train_samples_seen"] == 2 * 320  # every example once per epoch
        assert [r["step"] for r in logs[name]] == list(range(1, FINETUNE_STEPS + 1))
        # One scheduler step per optimizer step: stepping it once per process would run the schedule 2x as fast.
        assert [r["learning_rate"] for r in logs[name]] == pytest.approx(expected_lrs(FINETUNE_STEPS, FINETUNE_WARMUP),
                                                                        rel=1e-9)
    assert [r["learning_rate"] for r in logs["one"]] == [r["learning_rate"] for r in logs["two"]]


def test_two_processes_see_the_same_batches_so_the_losses_match_one_process(one_proc, two_proc):
    # Same init, same examples in every global batch (one loader worker: per-step identity), same augmentation
    # (seeded per example): only the float order of the gradient all-reduce differs.
    one = [r["train_loss"] for r in read_json(one_proc / "log_history.json") if "train_loss" in r]
    two = [r["train_loss"] for r in read_json(two_proc[0] / "log_history.json") if "train_loss" in r]
    assert len(one) == len(two) == FINETUNE_STEPS
    assert two == pytest.approx(one, rel=1e-5)  # measured: 1.1e-7
    assert one[-1] < one[0]  # it trains


def test_pretraining_streams_under_two_processes_with_accumulation(pretrain):
    results = read_json(pretrain / "all_results.json")
    assert results["global_step"] == PRETRAIN_STEPS
    assert results["train_samples_seen"] == 256
    lrs = [r["learning_rate"] for r in read_json(pretrain / "log_history.json") if "learning_rate" in r]
    assert lrs == pytest.approx(expected_lrs(PRETRAIN_STEPS, PRETRAIN_WARMUP), rel=1e-9)
    # The saved model is the one trained: the 32-px tiny ViT with the sample's 1000 classes, weights finite.
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(pretrain)
    assert (model.config.image_size, model.config.hidden_size, model.config.num_labels) == (32, 64, 1000)
    assert model.config.id2label[0] == "tench"
    assert all(p.isfinite().all() for p in model.parameters())


# ------------------------------------------------------------------------------------ exact coverage by example keys
@pytest.mark.parametrize("name", ["map", "stream"])
def test_each_example_reaches_exactly_one_rank_and_worker_once_per_epoch(probe, name):
    reference = read_json(probe / f"{name}.epoch.json")  # every example; map-style: in the epoch's order
    epoch = reference["keys"]
    ranks = [read_json(probe / f"{name}.rank{r}.json") for r in (0, 1)]
    world, workers, block = ranks[0]["world"], ranks[0]["workers"], ranks[0]["per_device_train_batch_size"]
    accumulation = ranks[0]["gradient_accumulation_steps"]
    assert (world, workers) == (2, 2)
    seen = collections.Counter(k for rank in ranks for batch in rank["batches"] for k in batch)
    assert len(epoch) == len(set(epoch)) >= ranks[0]["num_train_examples"]
    assert set(seen) <= set(epoch) and set(seen.values()) == {1}
    # Fewer than one global batch of the epoch is left out ...
    global_batch = block * world * accumulation
    assert 0 <= ranks[0]["num_train_examples"] - sum(seen.values()) < global_batch
    # ... every rank runs the same number of micro-batches (nobody waits in a collective for a rank that ran out) ...
    per_rank = ranks[0]["steps_per_epoch"] * accumulation
    assert [len(rank["batches"]) for rank in ranks] == [per_rank, per_rank]
    if not reference["map_style"]:
        return
    # ... and (map-style) micro-batch m of rank r is positions (m * N + r) * B ... of the epoch's order, whatever the
    # loader workers: with the global batch fixed, 1 and N processes train on the same examples in every step.
    for r, rank in enumerate(ranks):
        for m, batch in enumerate(rank["batches"]):
            start = (m * world + r) * block
            assert batch == epoch[start:start + block], (name, r, m)


# ------------------------------------------------------------------------------------------------------------ eval
def test_eval_under_two_processes_equals_one_process_on_the_same_weights(two_proc, tmp_path):
    """The 2-process run's final eval (ranks hold 72 and 56 of the 128 images) against ``python -m hf_vit.eval`` on
    one process over the same validation slice of the saved model."""
    from hf_vit import eval as hf_eval

    out = two_proc[0]
    with contextlib.redirect_stdout(io.StringIO()):
        hf_eval.main(["--model_name_or_path", str(out), "--dataset_name", str(CIFAR10), "--eval_split", "train",
                      "--train_val_split", "0.02", "--split_seed", "0", "--max_eval_samples", "128",
                      "--per_device_eval_batch_size", "24", "--dataloader_num_workers", "0",
                      "--output_dir", str(tmp_path)])
    one, two = read_json(tmp_path / "eval_results.json"), read_json(out / "eval_results.json")
    assert one["eval_samples"] == two["eval_samples"] == 128
    for key in ("eval_accuracy", "eval_top5_accuracy", "per_class", "confusion_matrix"):
        assert one[key] == two[key], key
    assert one["eval_loss"] == pytest.approx(two["eval_loss"], rel=1e-6)


# ---------------------------------------------------------------------------------- only the main process writes
def test_two_processes_leave_the_same_files_as_one_plus_rank_1_rng_states(one_proc, two_proc):
    out, _ = two_proc
    one = listing(one_proc)
    rank1_rng = {f"{c}/random_states_1.pkl" for c in ("checkpoint-10", "checkpoint-20")}
    assert {"model.safetensors", "all_results.json", "README.md", "hf_vit/*/events.out.tfevents.*",
            "checkpoint-20/random_states_0.pkl"} <= one
    assert listing(out) == one | rank1_rng


def test_rank_1_writes_nothing_but_its_rng_state(two_proc):
    _, events = two_proc
    # Rank 1's only Python-level writes are the folder accelerate.save_state makes before writing its
    # random_states_1.pkl (torch.save writes natively, so the file itself is not an audit event; the listing shows it).
    assert {(e["event"], *e["paths"]) for e in events[1]} == {("os.mkdir", "checkpoint-10.tmp"),
                                                               ("os.mkdir", "checkpoint-20.tmp")}
    # What the main process wrote in place or moved into place (the final outputs arrive from a staging folder).
    written = {e["paths"][0] for e in events[0] if e["event"] == "open"} | {
        e["paths"][1] for e in events[0] if e["event"] == "os.rename"}
    assert {"all_results.json", "log_history.json", "eval_results.json", "README.md", "train_config.yaml",
            "checkpoint-20.tmp/trainer_state.json"} <= written
    assert len([p for p in written if fnmatch.fnmatch(p, "hf_vit/*/events.out.tfevents.*")]) == 1


def test_checkpoints_are_complete_when_a_rank_saves_late(two_proc):
    out, events = two_proc
    # Rank 1 slept at each save; the main process still renamed checkpoint-N.tmp only after rank 1 had written
    # into it, so every checkpoint holds both ranks' RNG states and no .tmp folder is left behind.
    for step in (10, 20):
        assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= {
            p.name for p in (out / f"checkpoint-{step}").iterdir()}
    assert not list(out.glob("*.tmp"))
    # Rank 1 named those folders from its own step counter, so it reached steps 10 and 20 with rank 0; its last write
    # into each came before the main process renamed it.
    renamed = {e["paths"][0]: e["t"] for e in events[0]
               if e["event"] == "os.rename" and re.fullmatch(r"checkpoint-\d+\.tmp", e["paths"][0])}
    assert set(renamed) == {"checkpoint-10.tmp", "checkpoint-20.tmp"}
    for folder, t in renamed.items():
        assert max(e["t"] for e in events[1] if e["paths"][0] == folder) < t


# ------------------------------------------------------------------------------- resume with another process count
def test_resuming_a_two_process_checkpoint_on_one_process_is_refused_in_one_line(two_proc):
    out, _ = two_proc
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = run_script(["run_finetune.py", *FINETUNE, "--output_dir", str(out), "--resume_from_checkpoint", "latest"],
                      check=False, timeout=TIMEOUT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and str(out / "checkpoint-20") in error[0]
    assert "written by 2 processes, this run has 1" in error[0] and "--num_processes" in error[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refused before writing anything


# ------------------------------------------------------------------- the Slurm job script: preemption and requeue
def slurm_job(out: Path, log: Path) -> tuple[list[str], dict]:
    """``docs/slurm_train.sbatch`` as Slurm would run it on a 1-node allocation, with stand-ins for srun and scontrol
    (tests/fake_slurm): 2 processes on this machine, the fine-tuning run of this module."""
    env = {**os.environ, "PATH": os.pathsep.join([str(REPO / "tests" / "fake_slurm"), os.environ["PATH"]]),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "GPUS_PER_NODE": "2",
           "MAIN_PROCESS_PORT": str(29500 + os.getpid() % 1000), "FAKE_SLURM_LOG": str(log),
           "PYTHON": sys.executable, "SCRIPT": "run_finetune.py", "CONFIG": "", "OUTPUT_DIR": str(out),
           "TRAIN_ARGS": " ".join(FINETUNE)}
    return ["bash", str(REPO / "docs" / "slurm_train.sbatch")], env


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, cifar10_path) -> tuple[Path, Path, int, str]:
    """The job script, sent SIGTERM once training has taken a step — to the script only, as ``--signal=B:TERM``
    does. The script passes it to srun (here: the launcher), torchrun to each rank's whole process group."""
    base = tmp_path_factory.mktemp("slurm")
    out, slurm_log, output = base / "run", base / "scontrol.log", base / "job.out"
    cmd, env = slurm_job(out, slurm_log)
    with open(output, "w") as sink:
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.time() + TIMEOUT
        while job.poll() is None and time.time() < deadline and not re.search(
                rf"\| [1-9]\d*/{FINETUNE_STEPS} ", output.read_text()):
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        status = job.wait(timeout=TIMEOUT)
    return out, slurm_log, status, output.read_text()


def test_sigterm_to_the_job_script_checkpoints_every_rank_at_one_step_and_requeues(preempted):
    out, slurm_log, status, output = preempted
    saved = re.search(r"Preempted: checkpoint saved at step (\d+)", output)
    assert saved, output[-3000:]
    step = int(saved.group(1))
    assert 0 < step < FINETUNE_STEPS
    assert output.count("Received SIGTERM") == 2  # both ranks, each from its own handler
    # No rank crashed (torchrun itself ends with a SignalException and status 1 once the ranks have exited, which is
    # why the script does not read the launcher's status after a SIGTERM).
    assert not re.search(r"\[rank\d\]: Traceback", output) and "killed by signal" not in output
    checkpoint = out / f"checkpoint-{step}"
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "optimizer.bin"} <= {
        p.name for p in checkpoint.iterdir()}
    assert read_json(checkpoint / "trainer_state.json")["global_step"] == step
    assert not (out / "all_results.json").exists() and not list(out.glob("*.tmp"))
    assert status == 0 and slurm_log.read_text() == "requeue 4242\n"
    assert "requeueing job 4242" in output


@pytest.mark.slow
def test_the_requeued_job_resumes_to_the_uninterrupted_result(preempted, two_proc):
    from safetensors.torch import load_file

    out, slurm_log, _, _ = preempted
    cmd, env = slurm_job(out, slurm_log)
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0 and "training complete" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert slurm_log.read_text() == "requeue 4242\n"  # finished: not requeued again
    resumed = load_file(str(out / "model.safetensors"))
    uninterrupted = load_file(str(two_proc[0] / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)
    losses = [[r["train_loss"] for r in read_json(d / "log_history.json") if "train_loss" in r]
              for d in (out, two_proc[0])]
    assert losses[0] == losses[1]


# ------------------------------------------------------------------------------------------------- FSDP on CPU
@pytest.mark.slow
def test_fsdp_config_on_cpu_wraps_vit_layers_but_accelerate_runs_ddp(tmp_path):
    """What docs/scaling.md states about FSDP here (torch 2.14, accelerate 1.15, gloo): accelerate does not engage FSDP
    for CPU processes (the trainer's Accelerator gets MULTI_CPU, i.e. DDP); the config's wrap policy finds the ViT
    blocks; torch's FSDP2 over gloo shards them and reproduces the unsharded SGD step."""
    run_script(["-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "fsdp.yaml"),
                "--num_processes", "2", "--mixed_precision", "no",
                "--main_process_port", str(29000 + os.getpid() % 500),
                "tests/fsdp_cpu_check.py", str(tmp_path)], timeout=TIMEOUT)
    for rank in (0, 1):
        result = read_json(tmp_path / f"rank{rank}.json")
        assert result["distributed_type"] == "DistributedType.MULTI_CPU" and result["backend"] == "gloo"
        assert result["fsdp_version"] == 2
        assert result["wrapped"] == [f"vit.layers.{i}" for i in range(result["num_hidden_layers"])]
        assert result["classifier_rows_here"] * 2 == result["classifier_rows"]  # each rank holds half
        assert result["max_abs_diff_vs_unsharded"] < 1e-6


# ------------------------------------------------------------------------------------------------------- DeepSpeed
def test_deepspeed_config_gets_what_the_loop_cannot_hand_accelerate():
    """DeepSpeed is not installed here (docs/scaling.md says what was and was not run). What can be checked: the
    shipped ZeRO-2 config, as accelerate loads it, gets the micro-batch, no accumulation and the run's clipping — the
    "auto" values accelerate cannot fill without a dataloader — and accumulation is refused with a one-line error."""
    from accelerate.utils import DeepSpeedPlugin

    from hf_vit.config import parse_config, resolve_batch_sizes
    from hf_vit.errors import UserError
    from hf_vit.runtime import configure_deepspeed

    plugin = DeepSpeedPlugin(hf_ds_config=str(REPO / "accelerate_configs" / "deepspeed_zero2.json"))
    assert plugin.is_auto("train_micro_batch_size_per_gpu")  # what made accelerate.prepare raise before
    cfg = parse_config([*TINY_ARGS, "--max_grad_norm", "0.5"])
    resolve_batch_sizes(cfg.train, 8)  # the global batch of 32 over 8 GPUs
    configure_deepspeed(plugin.deepspeed_config, cfg.train)
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2

    # Accumulation: the run's steps go to the engine (it scales the loss by them), the micro-batch is the global
    # batch over processes x accumulation, and DeepSpeed's train_batch_size (micro x accumulation x processes) is the
    # run's global batch.
    cfg = parse_config([*TINY_ARGS, "--gradient_accumulation_steps", "2"])
    resolve_batch_sizes(cfg.train, 8)
    ds_config = dict(plugin.deepspeed_config)
    configure_deepspeed(ds_config, cfg.train)
    assert ds_config["gradient_accumulation_steps"] == 2 and ds_config["train_micro_batch_size_per_gpu"] == 2
    assert ds_config["train_micro_batch_size_per_gpu"] * 2 * 8 == cfg.train.total_train_batch_size
    with mock.patch("hf_vit.runtime.deepspeed_steps_at_accumulation_boundaries", return_value=False):
        with pytest.raises(UserError, match="gradient_accumulation_steps=2 cannot be used under DeepSpeed"):
            configure_deepspeed({}, cfg.train)


def test_a_second_run_in_one_process_starts_from_fresh_accelerate_settings():
    """runtime.fresh_accelerate_state (what a study calls between runs): accelerate refuses a second Accelerator with
    other settings in the same process until its singletons are reset; after the reset the next run gets its own."""
    from accelerate import Accelerator

    from hf_vit.runtime import fresh_accelerate_state

    Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(cpu=True, mixed_precision="no")
    state = fresh_accelerate_state()
    acc = Accelerator(cpu=True, mixed_precision="no")
    assert (acc.mixed_precision, acc.gradient_accumulation_steps, state.num_processes) == ("no", 1, 1)


def test_accelerate_steps_deepspeed_only_where_the_loops_accumulate_windows_end():
    """What lets configure_deepspeed pass accumulation on (accelerate 1.16, read from its source and checked here
    without DeepSpeed): with no prepared dataloader, ``accumulate`` sets ``sync_gradients`` on every K-th micro-batch
    only, and the DeepSpeed wrapper steps its engine only when ``backward`` gets that flag."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    from hf_vit.runtime import deepspeed_steps_at_accumulation_boundaries

    assert deepspeed_steps_at_accumulation_boundaries()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model = torch.nn.Linear(2, 2)
    flags = []
    for _ in range(2 * 3):  # two optimizer steps of the loop: range(gradient_accumulation_steps) each
        with acc.accumulate(model):
            flags.append(acc.sync_gradients)
    assert flags == [False, False, True, False, False, True]
    engine = mock.Mock()
    wrapper = DeepSpeedEngineWrapper(engine)
    for flag in flags:
        wrapper.backward(torch.tensor(1.0), sync_gradients=flag)
    assert engine.step.call_count == 2 and engine.backward.call_count == 6
    assert [c.kwargs["is_boundary"] for c in engine.set_gradient_accumulation_boundary.call_args_list] == flags


def test_pretraining_streams_by_shards_under_two_processes(tmp_path, imagenet_sample_path):
    """stream_sharding shards (the default), 2 processes x 2 loader workers over the 4 parquet files: the planned step
    count, 256 examples of the epoch each once, and the plan says the stream is read once (one file per consumer)."""
    out = tmp_path / "shards"
    proc = run_script(["run_pretrain.py", *PRETRAIN, "--stream_sharding", "shards", "--output_dir", str(out)],
                      nproc=2, timeout=TIMEOUT)
    results = read_json(out / "all_results.json")
    assert results["global_step"] == PRETRAIN_STEPS and results["train_samples_seen"] == 256
    import yaml

    plan = yaml.safe_load((out / "train_config.yaml").read_text())["run_plan"]
    assert plan["stream_rule"] == "shards" and plan["read_amplification"] == 1.0 and plan["processes"] == 2
    assert "Traceback" not in proc.stderr