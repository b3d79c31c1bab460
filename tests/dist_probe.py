"""Test helper, launched like the trainer:

    accelerate launch tests/dist_probe.py OUT NAME -- FLAGS [:: NAME -- FLAGS ...]

For each ``NAME -- FLAGS`` group it builds the trainer's own :class:`hf_vit.trainer.Run` from the training flags — so
the datasets, ``ExampleStream`` sharders, collate functions and loaders are exactly the ones a training run would use on
this rank — iterates epoch 0 of the train loader (workers and all) and writes ``OUT/NAME.rank<R>.json`` with the keys
of every micro-batch this rank received, in order. Rank 0 also writes ``OUT/NAME.epoch.json``: the keys of the whole
epoch as one consumer sees them (world 1, one worker), the reference the ranks' shares must add up to.
Nothing is trained and nothing is written to the run's output_dir.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when hf_vit is not installed

import datasets  # noqa: E402

from hf_vit.config import parse_config  # noqa: E402
from hf_vit.data import example_key  # noqa: E402
from hf_vit.data.keys import epoch_order  # noqa: E402
from hf_vit.trainer import Run  # noqa: E402


def probe(out: Path, name: str, flags: list[str]) -> None:
    run = Run(parse_config(flags))
    acc, t = run.accelerator, run.cfg.train
    run.train_data.set_epoch(0)
    batches = [batch.keys for batch in run.train_data]
    record = {"rank": acc.process_index, "world": acc.num_processes, "workers": run.cfg.data.dataloader_num_workers,
              "per_device_train_batch_size": t.per_device_train_batch_size,
              "gradient_accumulation_steps": t.gradient_accumulation_steps, "steps_per_epoch": run.steps_per_epoch,
              "num_train_examples": run.data.num_train_examples, "batches": batches}
    (out / f"{name}.rank{acc.process_index}.json").write_text(json.dumps(record))
    if acc.is_main_process:
        # The reference: every example of the split, and for map-style data the epoch's order (keys.epoch_order).
        keys = [example_key(example[run.data.image_column]) for example in run.data.train]
        if isinstance(run.data.train, datasets.Dataset):
            keys = [keys[i] for i in epoch_order(len(keys), t.seed, 0).tolist()]
        (out / f"{name}.epoch.json").write_text(json.dumps({"map_style": isinstance(run.data.train, datasets.Dataset),
                                                            "keys": keys}))
    acc.wait_for_everyone()


def main(argv: list[str]) -> None:
    out, rest = Path(argv[0]), argv[1:]
    out.mkdir(parents=True, exist_ok=True)
    while rest:
        group, rest = (rest[: rest.index("::")], rest[rest.index("::") + 1:]) if "::" in rest else (rest, [])
        probe(out, group[0], group[2:])  # NAME -- FLAGS


if __name__ == "__main__":
    main(sys.argv[1:])
