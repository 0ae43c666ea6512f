"""Batches onto the training device: as stored (uint8 views, target codes), pinned, one step ahead on CUDA.

The reader hands out host arrays (``radio_dist.train.reader.Batch``). ``device_batches`` turns them into
``DeviceBatch``es: on CUDA each batch is copied from pinned memory on a side stream while the previous step
trains, and the training stream waits for the copy only when it uses the batch; elsewhere the copy is a
plain conversion. Images cross as uint8 and targets as the store holds them (fp16 values, or int8 / 4-bit
codes and their scales: a half, a quarter or an eighth of float32's bytes); the codes are decoded on the
device, once per batch for every student, and converting, resizing and cropping happen there too
(``radio_dist.train.step``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from radio_dist.train.reader import Batch


@dataclass
class DeviceBatch:
    """One step's batch on the device; ``host`` keeps the step, ids and partition."""

    host: Batch
    images: torch.Tensor  # uint8 [n, P, P, 3]
    dense: dict[
        str, torch.Tensor
    ]  # teacher -> [n, h, w, C] decoded on the device (fp16 as stored, or float32)
    summary: dict[str, torch.Tensor | None]  # teacher -> float32 [n, C] or None
    h2d_s: float  # host time spent issuing the copies (on CUDA they complete asynchronously)

    def __len__(self) -> int:
        return len(self.host)


def _copy(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        if not t.is_pinned():  # the reader's buffers already are (host_alloc): no second host copy
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def host_alloc(device: torch.device) -> Callable[[tuple[int, ...], np.dtype], np.ndarray] | None:
    """The reader's batch buffers for ``device``: page-locked host memory on CUDA (rows are read straight into
    it and copied to the device from there), None (plain numpy arrays) elsewhere."""
    if device.type != "cuda":
        return None

    def pinned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(dtype)], pin_memory=True).numpy()

    return pinned


_TORCH_DTYPES = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
}


def decode(batch: Batch, teacher: str, codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A teacher's targets from their codes (already on ``device``): the codec's decode, on the device."""
    codec = batch.codecs.get(teacher)
    if codec is None or not codec.has_scale:
        return codes
    return codec.decode(codes, _copy(batch.dense_scale[teacher], device))


def to_device(batch: Batch, device: torch.device) -> DeviceBatch:
    """Copy one batch's arrays to ``device`` (non-blocking from pinned memory on CUDA)."""
    t0 = time.perf_counter()
    images = _copy(batch.images, device)
    dense = {t: decode(batch, t, _copy(a, device), device) for t, a in batch.dense.items()}
    summary = {t: (_copy(a, device) if a is not None else None) for t, a in batch.summary.items()}
    return DeviceBatch(batch, images, dense, summary, time.perf_counter() - t0)


def _tensors(db: DeviceBatch) -> list[torch.Tensor]:
    return [db.images, *db.dense.values(), *(s for s in db.summary.values() if s is not None)]


def device_batches(batches: Iterable[Batch], device: torch.device) -> Iterator[DeviceBatch]:
    """The batches on ``device``; on CUDA the next one is already being copied while the caller trains."""
    if device.type != "cuda":
        for b in batches:
            yield to_device(b, device)
        return
    stream = torch.cuda.Stream(device)
    it = iter(batches)

    def issue() -> DeviceBatch | None:
        b = next(it, None)
        if b is None:
            return None
        with torch.cuda.stream(stream):
            return to_device(b, device)

    ahead = issue()
    while ahead is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        for t in _tensors(ahead):  # the copy stream's memory is now used on the training stream
            t.record_stream(torch.cuda.current_stream(device))
        current, ahead = ahead, issue()
        yield current
