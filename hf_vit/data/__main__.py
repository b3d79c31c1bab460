"""``python -m hf_vit.data describe ...``: what a dataset and its ``train_fraction`` subset hold (see
:func:`hf_vit.data.sources.describe`)."""

from ..errors import run_cli
from .sources import main

if __name__ == "__main__":
    run_cli(main)
