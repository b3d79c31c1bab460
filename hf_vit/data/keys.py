"""The rules every data path must agree on: an example's identity, which split it belongs to, and the seeds of an
epoch's order and of an example's augmentation.

The loader path, ``data_on_device`` and ``decode_on_device`` give the same batches (and a resumed epoch the same
batches as the uninterrupted one) because they all draw from these functions and nothing else.
"""

from __future__ import annotations

import hashlib

import torch


# The key of a row whose image is missing (None, or neither bytes nor path). Such a row is never carved into the
# validation split and always kept by the train_fraction subset: it stays in train, where the collate skips it and
# counts it as unusable (``train_skipped_samples``), on every path — map-style, streaming, counted or not.
MISSING_IMAGE_KEY = "<missing image>"


def example_key(image: dict | None) -> str:
    """Stable identity of an example, the same on every machine and in every mode.

    The image's path when it has one, reduced to its last two components (``n01440764/n01440764_10026.JPEG``,
    ``cat/1.jpg``): unique within a dataset, yet independent of where the files lie. Without a path, a hash of the
    image bytes. A missing image (None, or neither path nor bytes) is :data:`MISSING_IMAGE_KEY`.
    """
    if not isinstance(image, dict) or (not image.get("path") and image.get("bytes") is None):
        return MISSING_IMAGE_KEY
    path = image.get("path")
    if path:
        parts = path.replace("\\", "/").rstrip("/").split("/")
        return "/".join(parts[-2:])
    return hashlib.blake2b(image.get("bytes") or b"", digest_size=12).hexdigest()


def unit_hash(key: str, seed: int, salt: str) -> float:
    """Deterministic number in [0, 1) from (key, seed): the same on every machine, process and worker."""
    digest = hashlib.blake2b(f"{salt}:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def in_validation(key: str, fraction: float, seed: int) -> bool:
    """Whether an example belongs to the ``train_val_split`` carve-out (decided by its key alone; a missing image
    never does)."""
    return key != MISSING_IMAGE_KEY and unit_hash(key, seed, "val") < fraction


def in_subset(key: str, fraction: float, subset_seed: int) -> bool:
    """Whether an example belongs to the ``train_fraction`` subset (decided by its key alone; a missing image always
    does, so that it is counted as unusable rather than dropped unseen)."""
    return fraction >= 1 or key == MISSING_IMAGE_KEY or unit_hash(key, subset_seed, "subset") < fraction


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch: its example order, and everything the on-device paths draw per position."""
    return seed * 1_000_003 + epoch


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one of an epoch's random streams: 0 is the example order (and the shard order), the on-device
    augmentation uses its own streams so that they never share draws with the order."""
    base = epoch_seed(seed, epoch)
    return torch.Generator().manual_seed(base if stream == 0 else base * 2 + stream)


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of dataset positions (map-style data on every path; shards when dealt by shard)."""
    return torch.randperm(num_examples, generator=epoch_generator(seed, epoch))


def augmentation_seed(key: str, seed: int, epoch: int) -> int:
    """The seed of one example's augmentation in one epoch: the same whichever worker, process or path decodes it."""
    return int(unit_hash(key, seed * 100_003 + epoch, "aug") * 2**62)


def position_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the draws made for a position of the epoch order (``data_on_device``'s batched augmentation)."""
    return epoch_seed(seed, epoch) * 1_000_003 + position


def unit_generator(seed: int, epoch: int, unit: int) -> torch.Generator:
    """A CPU generator for the order of one stream unit's rows in one epoch (``sharding.unit_permutation``)."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch) * 1_000_033 + 7 * unit + 3)
