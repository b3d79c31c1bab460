"""Push a finished or crashed run to the Hugging Face Hub after the fact.

    python -m hf_vit.push outputs/vit-cifar10 --hub_model_id me/vit-cifar10 [--private] [--include_checkpoints]

Uploads the same top-level files as ``push_to_hub`` at the end of training; with ``--include_checkpoints`` the latest
complete ``checkpoint-<N>`` also goes to ``last-checkpoint/`` so that training can resume from the Hub.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hf_vit.errors import UserError, raise_user_errors, run_cli
from hf_vit.checkpoint import complete_checkpoints
from hf_vit.hub import HubPusher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = raise_user_errors(argparse.ArgumentParser(prog="python -m hf_vit.push",
                                                       description=__doc__.splitlines()[0]))
    parser.add_argument("run_dir", help="the output_dir of a training run")
    parser.add_argument("--hub_model_id", required=True,
                        help="repo to push to, e.g. user/vit-cifar10 (created if needed)")
    parser.add_argument("--private", action="store_true", help="create a new repo as private")
    parser.add_argument("--hub_token", default=None, help="write token (default: HF_TOKEN, then `hf auth login`)")
    parser.add_argument(
        "--include_checkpoints", action="store_true",
        help="also push the latest complete checkpoint to last-checkpoint/"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist; pass the output_dir of a training run")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pusher = HubPusher(
        str(run_dir),
        hub_model_id=args.hub_model_id,
        private=args.private,
        strategy="checkpoint" if args.include_checkpoints else "end",
        token=args.hub_token,
    )
    if args.include_checkpoints:
        checkpoints = complete_checkpoints(run_dir)
        if not checkpoints:
            raise UserError(f"{str(run_dir)!r} holds no complete checkpoint-<step> folder; drop --include_checkpoints")
        pusher.on_save(str(checkpoints[-1]))
    url = pusher.on_end()
    if pusher.failed_uploads:
        failed = ", ".join(pusher.failed_uploads)
        raise UserError(f"could not push {failed} to {args.hub_model_id}; see the warnings above")
    return url


if __name__ == "__main__":
    run_cli(main)
