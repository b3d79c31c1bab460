"""Fine-tune a ViT (a pretrained checkpoint with a new head, or a preset from scratch) on an image dataset.

    accelerate launch run_finetune.py --config recipes/cifar10_vit_base_finetune.yaml \
        --model_name_or_path outputs/imagenet_vit_base [--flag value ...]
"""

from hf_vit.config import parse_config
from hf_vit.errors import run_cli
from hf_vit.trainer import train


def main(argv=None):
    train(parse_config(argv))


if __name__ == "__main__":
    run_cli(main)
