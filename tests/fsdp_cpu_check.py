"""What FSDP can do on CPU (gloo), checked with 2 processes:

    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/fsdp_cpu_check.py OUT_DIR

1. The trainer's Accelerator (``cpu=True`` when there is no GPU): which distributed type accelerate picks.
2. accelerate's FSDP plugin built from this config (the launcher exports it as FSDP_* variables): which modules its
   auto-wrap policy shards.
3. torch's own FSDP2 (``fully_shard``) applied to exactly those modules over gloo: one SGD step, then the full state
   dict gathered on every rank — compared with the same step taken by the unsharded model.

Each rank writes ``OUT_DIR/rank<R>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import ViTConfig, ViTForImageClassification


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=3, num_attention_heads=2, num_labels=10))


def one_step(model, pixels, labels) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # scale-sensitive: a gradient sum would show
    loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # as hf_vit.trainer does for CPU launches
    rank = accelerator.process_index
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables of the config file
    model = tiny_vit()
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy is not None and policy(module)]

    # The same global batch on both ranks for the reference; each rank feeds its half to the sharded model.
    generator = torch.Generator().manual_seed(1)
    pixels, labels = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    reference = tiny_vit()
    one_step(reference, pixels, labels)

    for name in wrapped:
        fully_shard(model.get_submodule(name))
    fully_shard(model)
    half = slice(4 * rank, 4 * rank + 4)
    one_step(model, pixels[half], labels[half])  # FSDP averages the gradients over ranks: the mean over all 8
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    worst = max((full[k] - v).abs().max().item() for k, v in reference.state_dict().items())
    local = model.classifier.weight.to_local().shape[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "distributed_type": str(accelerator.distributed_type), "backend": accelerator.state.backend,
        "fsdp_version": plugin.fsdp_version, "wrapped": wrapped, "num_hidden_layers": model.config.num_hidden_layers,
        "classifier_rows_here": local, "classifier_rows": reference.classifier.weight.shape[0],
        "max_abs_diff_vs_unsharded": worst,
    }))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
