"""Fault injection: SIGKILL a training run at random steps, restart it with ``--resume_from_checkpoint latest`` until it
finishes, and compare the final state bit for bit with an uninterrupted run of the same configuration.

    python benchmarks/fault_inject.py --cycles 5 --mode both [--kills 2] [--seed 0] [--workdir DIR]

Per mode (``map``: CIFAR-10 as a map-style dataset, ``streaming``: the same parquet folder as an IterableDataset) it
trains one uninterrupted reference, then ``--cycles`` times: launch -> SIGKILL when the progress bar reaches a random
step (plus a random few milliseconds, so kills land inside steps, evaluations and checkpoint saves alike) ->
relaunch with ``--resume_from_checkpoint latest`` -> ... -> run to the end. "Identical" means every tensor of the
final ``model.safetensors``, of the newest checkpoint's ``model.safetensors``, ``ema.safetensors`` and optimizer state,
and the data position in its ``trainer_state.json``, equal the reference's exactly.

The configuration is the tiny preset on real CIFAR-10 with every piece of state a resume must restore switched on:
dropout and MixUp (global torch RNG), an EMA, gradient accumulation (the data position counts micro-batches),
2 loader workers (the position rotates over workers), mid-epoch checkpoints every 3 steps and evaluation every 10.
Prints ``<mode>: identical: k/N`` per mode and a JSON summary as the last line; exits 1 unless all are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = Path(os.environ.get("HF_VIT_SHARED_DATASETS", REPO.parent / "shared" / "datasets")).resolve() / "cifar10"

# The tiny preset; 320 training images, global batch 32 = 16 x 2 accumulation -> 10 steps per epoch, 20 steps.
BASE_ARGS = [
    "--model_preset", "vit_tiny_cifar", "--hidden_size", "64", "--intermediate_size", "128",
    "--num_hidden_layers", "2", "--num_attention_heads", "2", "--hidden_dropout_prob", "0.1",
    "--max_train_samples", "320", "--max_eval_samples", "64", "--total_train_batch_size", "32",
    "--gradient_accumulation_steps", "2", "--num_train_epochs", "2", "--warmup_epochs", "0.5",
    "--learning_rate", "1e-3", "--crop_padding", "4", "--mixup_alpha", "0.2", "--ema_decay", "0.9",
    "--dataloader_num_workers", "2", "--report_to", "none", "--logging_steps", "5", "--eval_steps", "10",
    "--checkpointing_steps", "3", "--checkpoints_total_limit", "2", "--seed", "7",
]
TOTAL_STEPS = 20
MODE_ARGS = {"map": [], "streaming": ["--streaming", "true", "--shuffle_buffer_size", "256"]}
PROGRESS = re.compile(r"train:.*?(\d+)/(\d+) \[")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def train_command(mode: str, output_dir: Path, data: Path = CIFAR10, extra: list[str] | None = None) -> list[str]:
    """The ``run_finetune.py`` command line of one mode writing into ``output_dir``."""
    return [sys.executable, str(REPO / "run_finetune.py"), "--dataset_name", str(data), *BASE_ARGS, *MODE_ARGS[mode],
            "--output_dir", str(output_dir), *(extra or [])]


class Launch:
    """One training process whose combined output is logged to a file and watched for the progress-bar step."""

    def __init__(self, cmd: list[str], log_path: Path, new_session: bool = False):
        self.step, self.lines = -1, []
        self.log = open(log_path, "ab")
        # new_session: the run and its loader workers form their own process group, to be signalled as one.
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=new_session)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        pending = b""
        while chunk := self.proc.stdout.read1(4096):
            self.log.write(chunk)
            pending += chunk
            # tqdm redraws with \r; split on both so every update is seen as it arrives.
            *parts, pending = re.split(rb"[\r\n]", pending)
            for part in parts:
                text = part.decode(errors="replace")
                if text.strip():
                    self.lines.append(text)
                if m := PROGRESS.search(text):
                    self.step = int(m.group(1))
        self.log.write(pending)
        self.log.flush()

    def wait(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=30)
        self.log.close()
        return rc

    def output(self) -> str:
        return "\n".join(self.lines)


def newest_checkpoint(output_dir: Path) -> Path | None:
    found = [p for p in output_dir.glob("checkpoint-*") if _CHECKPOINT.match(p.name)
             and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)), default=None)


def run_with_kills(cmd: list[str], output_dir: Path, kill_steps: list[int], rng: random.Random,
                   log_path: Path, timeout: float = 900) -> dict:
    """Run ``cmd``; SIGKILL it once its progress reaches each of ``kill_steps`` (ascending) and relaunch it with
    ``--resume_from_checkpoint latest`` until it exits 0. Returns what happened at each kill."""
    kills, pending, launches = [], list(kill_steps), 0
    deadline = time.time() + timeout
    while True:
        tmp_before = set(output_dir.glob("checkpoint-*.tmp"))
        launch = Launch(cmd if launches == 0 else [*cmd, "--resume_from_checkpoint", "latest"], log_path)
        launches += 1
        target = pending.pop(0) if pending else None
        while target is not None and launch.proc.poll() is None:
            if launch.step >= target:
                time.sleep(rng.uniform(0.0, 0.08))  # land anywhere inside the step, an evaluation or a save
                launch.proc.send_signal(signal.SIGKILL)
                break
            if time.time() > deadline:
                launch.proc.kill()
                raise TimeoutError(f"{cmd} did not finish within {timeout} s")
            time.sleep(0.002)
        rc = launch.wait()
        if rc == -signal.SIGKILL:
            newest = newest_checkpoint(output_dir)
            # .tmp folders this launch left: a save (checkpoint-N.tmp) or a deletion (.deleting.tmp) the kill cut short.
            left = sorted(p.name for p in set(output_dir.glob("checkpoint-*.tmp")) - tmp_before)
            kills.append({"target_step": target, "seen_step": launch.step, "tmp_left": left,
                          "resume_from": newest.name if newest else None})
            continue
        if rc != 0:
            raise RuntimeError(f"launch {launches} exited {rc}; log in {log_path}:\n{launch.output()[-3000:]}")
        return {"launches": launches, "kills": kills}


def _optimizer_tensors(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    flat = {}
    for pid, per_param in state["state"].items():
        for name, value in per_param.items():
            flat[f"{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def final_state(output_dir: Path) -> dict:
    """The tensors and positions compared between runs: final model, newest checkpoint's model/EMA/optimizer."""
    ckpt = newest_checkpoint(output_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint in {output_dir}")
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    return {
        "checkpoint": ckpt.name,
        "position": {k: trainer_state[k] for k in ("global_step", "epoch", "step_in_epoch", "samples_seen",
                                                   "nonfinite_steps")},
        "final_model": load_file(output_dir / "model.safetensors"),
        "checkpoint_model": load_file(ckpt / "model.safetensors"),
        "checkpoint_ema": load_file(ckpt / "ema.safetensors") if (ckpt / "ema.safetensors").exists() else {},
        "checkpoint_optimizer": _optimizer_tensors(ckpt / "optimizer.bin"),
    }


def compare(reference: dict, other: dict) -> list[str]:
    """Differences between two ``final_state`` results (empty when bit-identical)."""
    diffs = []
    for key in ("checkpoint", "position"):
        if reference[key] != other[key]:
            diffs.append(f"{key}: {reference[key]} != {other[key]}")
    for group in ("final_model", "checkpoint_model", "checkpoint_ema", "checkpoint_optimizer"):
        a, b = reference[group], other[group]
        if set(a) != set(b):
            diffs.append(f"{group}: different tensor names")
            continue
        differing = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        if differing:
            worst = max(differing, key=lambda k: (a[k].float() - b[k].float()).abs().max().item())
            diffs.append(f"{group}: {len(differing)}/{len(a)} tensors differ (max |diff| "
                         f"{(a[worst].float() - b[worst].float()).abs().max().item():.3g} in {worst})")
    return diffs


def run_reference(mode: str, workdir: Path) -> Path:
    """Train the uninterrupted reference of ``mode`` into ``workdir/<mode>-reference``; returns that folder."""
    ref_dir = workdir / f"{mode}-reference"
    ref = Launch(train_command(mode, ref_dir), workdir / f"{mode}-reference.log")
    if ref.wait() != 0:
        raise RuntimeError(f"{mode} reference run failed:\n{ref.output()[-3000:]}")
    return ref_dir


def run_mode(mode: str, cycles: int, kills_per_cycle: int, workdir: Path, rng: random.Random,
             reference_dir: Path | None = None, total_steps: int = TOTAL_STEPS) -> dict:
    """``cycles`` killed-and-resumed runs of one mode compared with its reference (trained first unless
    ``reference_dir`` is given); returns the summary of the mode."""
    start = time.time()
    reference = final_state(reference_dir or run_reference(mode, workdir))
    identical, results = 0, []
    for cycle in range(cycles):
        out = workdir / f"{mode}-cycle{cycle}"
        steps = sorted(rng.sample(range(1, total_steps), kills_per_cycle))
        record = run_with_kills(train_command(mode, out), out, steps, rng, workdir / f"{mode}-cycle{cycle}.log")
        diffs = compare(reference, final_state(out))
        identical += not diffs
        results.append({**record, "identical": not diffs, "differences": diffs})
        print(f"{mode} cycle {cycle}: killed at steps {[k['seen_step'] for k in record['kills']]}, resumed from "
              f"{[k['resume_from'] for k in record['kills']]}, cut-short saves/deletions "
              f"{[k['tmp_left'] for k in record['kills'] if k['tmp_left']]}: "
              f"{'identical' if not diffs else 'DIFFERENT: ' + '; '.join(diffs)}", flush=True)
    print(f"{mode}: identical: {identical}/{cycles}", flush=True)
    return {"identical": identical, "cycles": cycles, "kills": sum(len(r["kills"]) for r in results),
            "kills_inside_a_save_or_deletion": sum(bool(k["tmp_left"]) for r in results for k in r["kills"]),
            "seconds": round(time.time() - start, 1), "runs": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=5, help="killed-and-resumed runs per mode")
    parser.add_argument("--mode", choices=["map", "streaming", "both"], default="both")
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per cycle, at random distinct steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill steps and delays")
    parser.add_argument("--workdir", type=Path, default=None, help="keep runs and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if not CIFAR10.is_dir():
        print(f"error: CIFAR-10 not found at {CIFAR10}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fault_inject_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    modes = ["map", "streaming"] if args.mode == "both" else [args.mode]
    summary = {mode: run_mode(mode, args.cycles, args.kills, workdir, rng) for mode in modes}
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({mode: {k: v for k, v in s.items() if k != "runs"} for mode, s in summary.items()}))
    return 0 if all(s["identical"] == s["cycles"] for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
