"""Push a finished run, or one checkpoint of a run, to the Hugging Face Hub after the fact.

    python -m hf_vit.push outputs/vit-cifar10 --hub_model_id me/vit-cifar10 [--private] [--include_checkpoints]
    python -m hf_vit.push outputs/vit-cifar10/checkpoint-600 --hub_model_id me/vit-cifar10 [--private]

A run folder must hold a finished run: ``all_results.json`` and the model committed by its run. Only the files the run
recorded as its own go up (the final outputs named in ``.hf_vit_run.json``, and ``train_config.yaml``): nothing else
in the folder, whatever its name. With ``--include_checkpoints`` the latest complete checkpoint (its files as its
``manifest.json`` lists them, verified first) also goes to ``last-checkpoint/`` so that training can resume from the
Hub. A ``checkpoint-<N>`` folder of a run pushes that checkpoint's model files to the repo root and the whole
checkpoint to ``last-checkpoint/``. Anything else (a crashed run, a folder hf_vit did not write, a run in progress) is
refused in one line. A new repo is public unless ``--private``; an existing repo keeps its visibility.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from hf_vit.checkpoint import complete_checkpoints
from hf_vit.errors import UserError, raise_user_errors, run_cli
from hf_vit.hub import HubPusher, run_files
from hf_vit.manifest import verify_manifest
from hf_vit.run_dir import COMMIT, FINISHED, LOCK, check_output_dir_available, created_by_hf_vit

_CHECKPOINT = re.compile(r"checkpoint-\d+")
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = raise_user_errors(argparse.ArgumentParser(prog="python -m hf_vit.push",
                                                       description=__doc__.splitlines()[0]))
    parser.add_argument("run_dir", help="the output_dir of a finished training run, or a checkpoint-<N> folder of one")
    parser.add_argument("--hub_model_id", required=True,
                        help="repo to push to, e.g. user/vit-cifar10 (created if needed: public unless --private)")
    parser.add_argument("--private", action="store_true", help="create a new repo as private (default: public)")
    parser.add_argument("--hub_token", default=None, help="write token (default: HF_TOKEN, then `hf auth login`)")
    parser.add_argument(
        "--include_checkpoints", action="store_true",
        help="also push the latest complete checkpoint to last-checkpoint/"
    )
    return parser.parse_args(argv)


def _check_checkpoint(path: Path) -> None:
    """A checkpoint hf_vit saved, complete and unaltered (its manifest verified); else a one-line UserError."""
    if not (_CHECKPOINT.fullmatch(path.name) and (path / "trainer_state.json").is_file()
            and created_by_hf_vit(path.parent, path.name)):
        raise UserError(f"{str(path)!r} is not a complete checkpoint saved by an hf_vit run; pass a run folder or "
                        "one of its checkpoint-<N> folders")
    verify_manifest(path)  # only the files it was saved with, as saved


def _check_finished_run(run_dir: Path) -> list[str]:
    """The files a finished run may publish; a folder that is not one is a one-line UserError."""
    check_output_dir_available(run_dir, overwrite=True, resuming=True)  # refuses a folder a live run holds (and a file)
    if (run_dir / COMMIT).exists():
        raise UserError(f"{str(run_dir)!r} holds final outputs whose commit was interrupted; run any hf_vit "
                        "command on it (e.g. resume it) to finish the commit, then push")
    files = run_files(run_dir)
    if FINISHED not in files or not any(w in files for w in MODEL_WEIGHTS):
        held = " (it holds only its configuration: the run did not finish)" if files == ["train_config.yaml"] else ""
        raise UserError(f"{str(run_dir)!r} is not a finished hf_vit run (no {FINISHED} and model.safetensors "
                        f"committed by its run){held}; push a finished run, or a checkpoint-<N> folder of one")
    return files


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist; pass the output_dir of a training run")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    checkpoint, only_checkpoint = None, _CHECKPOINT.fullmatch(run_dir.resolve().name) is not None
    if only_checkpoint:
        checkpoint, run_dir = run_dir, run_dir.resolve().parent
        _check_checkpoint(checkpoint)
        if (run_dir / LOCK).exists():
            check_output_dir_available(run_dir, overwrite=True, resuming=True)  # a live run's folder: refused
    else:
        _check_finished_run(run_dir)
        if args.include_checkpoints:
            ours = [c for c in complete_checkpoints(run_dir) if created_by_hf_vit(run_dir, c.name)]
            if not ours:
                raise UserError(f"{str(run_dir)!r} holds no complete checkpoint-<step> folder; drop "
                                "--include_checkpoints")
            checkpoint = ours[-1]
            _check_checkpoint(checkpoint)
    pusher = HubPusher(
        str(run_dir),
        hub_model_id=args.hub_model_id,
        private=args.private,
        strategy="checkpoint" if checkpoint is not None else "end",
        token=args.hub_token,
    )
    if checkpoint is not None:
        pusher.on_save(str(checkpoint))
    if only_checkpoint:
        url = pusher.close()
        if url is not None:
            print(f"Pushed {checkpoint} to the Hub: {url}", flush=True)
    else:
        url = pusher.on_end()
    if pusher.failed_uploads:
        failed = ", ".join(pusher.failed_uploads)
        raise UserError(f"could not push {failed} to {args.hub_model_id}; see the warnings above")
    return url


if __name__ == "__main__":
    run_cli(main)
