"""The micro-batch every data path hands to the loop (and the eval data to scoring): one type, the same fields on
every path, so the loop never learns which path served it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Batch:
    """One micro-batch: ``pixel_values`` uint8 (B, 3, S, S) and ``labels`` int64 (B,) — on the device once
    :meth:`to` moved them — the B examples' ``keys`` (``keys.example_key``), ``bad_keys`` (``"key (reason)"`` of the
    examples dropped as unusable), ``num_examples`` (examples in, good or bad) and, for eval data, the B examples'
    ``positions`` in the split as loaded (empty for train batches). B may be 0."""

    pixel_values: torch.Tensor
    labels: torch.Tensor
    keys: list[str] = field(default_factory=list)
    bad_keys: list[str] = field(default_factory=list)
    num_examples: int = 0
    positions: list[int] = field(default_factory=list)

    def to(self, device: torch.device) -> Batch:
        """The batch with its tensors on ``device`` (a pinned copy runs asynchronously)."""
        return replace(self, pixel_values=self.pixel_values.to(device, non_blocking=True),
                       labels=self.labels.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (``pin_memory=True`` on CUDA)."""
        return replace(self, pixel_values=self.pixel_values.pin_memory(), labels=self.labels.pin_memory())

    @classmethod
    def empty(cls, image_size: int, num_examples: int = 0, bad_keys: list[str] | None = None) -> Batch:
        return cls(torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                   [], list(bad_keys or []), num_examples)


@dataclass
class JpegPlanBatch(Batch):
    """A ``decode_on_device`` micro-batch on its way from a loader worker to the device: :class:`Batch`'s fields for
    the examples the worker decoded itself, then, for the n plain JPEGs (listed after them in ``labels`` and
    ``keys``), their file bytes and crop plans. ``DeviceJpegDecoder`` turns it into a :class:`Batch`."""

    jpeg_data: list[torch.Tensor] = field(default_factory=list)  # n uint8 1-D tensors of file bytes
    jpeg_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.long))  # top/left/h/w
    jpeg_flips: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    jpeg_seeds: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def pin_memory(self) -> JpegPlanBatch:
        return replace(self, pixel_values=self.pixel_values.pin_memory(), labels=self.labels.pin_memory())
