"""Pretrain a ViT from scratch (e.g. ViT-B/16 on ImageNet-1K).

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml run_pretrain.py \
        --config recipes/imagenet_vit_base_pretrain.yaml [--flag value ...]
"""

from hf_vit.config import parse_config
from hf_vit.errors import run_cli
from hf_vit.trainer import train


def main(argv=None):
    train(parse_config(argv, defaults={"model_preset": "vit_base_patch16_224"}))


if __name__ == "__main__":
    run_cli(main)
