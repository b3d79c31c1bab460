"""hf_vit: Vision Transformer pretraining (ImageNet) and fine-tuning (CIFAR-10) on the Hugging Face stack."""

import warnings

# torchvision 0.29 announces (on every call) that its image decoders will move to TorchCodec; the pinned version has
# them, and data_on_device / decode_on_device use them. (pytest resets filters per test: pyproject.toml repeats this.)
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)
