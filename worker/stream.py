"""Streamed images (issue 17): a client's images on disk stay on disk, decoded batch by batch while
training and evaluating, so that the memory a hosted client needs is bounded by a few batches, not
by its dataset (ImageFolder, one-folder and DomainNet data; CIFAR-100's arrays and the built-in
digits are small and stay in memory).

``LazyImages`` stands where a ``ClientData``'s ``x_train``/``x_test`` array would: it has a
``shape``, indexing it with an index array gives a lazy subset (the validation split), and
``worker.train`` iterates it through a ``torch.utils.data.DataLoader`` (``batches``) in exactly
the order it would index an array, decoding in ``workers`` processes (the worker's
``--data-workers``) with pinned memory on CUDA. Decoding is deterministic, so training on
streamed images gives the bytes training on the same images in memory gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch


class LazyImages:
    """Image files as an (N, C, H, W) float32 array-like, decoded on demand by ``decode``."""

    dtype = np.float32

    def __init__(self, files: Sequence[Path], decode: Callable[[Path], np.ndarray], item_shape: tuple[int, ...],
                 workers: int = 0) -> None:
        self.files = tuple(files)
        self.decode = decode
        self.item_shape = tuple(item_shape)
        self.workers = workers

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.files), *self.item_shape)

    def __getitem__(self, index: object) -> "LazyImages":
        """A lazy subset: ``index`` is a slice or an array of positions."""
        if isinstance(index, slice):
            files = self.files[index]
        else:
            positions = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index).reshape(-1)
            files = tuple(self.files[int(i)] for i in positions)
        return LazyImages(files, self.decode, self.item_shape, self.workers)

    def load(self, positions: Sequence[int] | None = None) -> np.ndarray:
        """The images at ``positions`` (all when None) decoded, stacked."""
        chosen = self.files if positions is None else [self.files[int(i)] for i in positions]
        if not chosen:
            return np.zeros((0, *self.item_shape), dtype=np.float32)
        return np.stack([self.decode(path) for path in chosen]).astype(np.float32, copy=False)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:  # noqa: ARG002
        return self.load()


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, images: LazyImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images.decode(self.images.files[i]))


def batches(images: LazyImages, order: Sequence[Sequence[int]], device: str | torch.device) -> Iterator[torch.Tensor]:
    """The images of each index batch of ``order``, in that order, as float32 tensors on ``device``:
    decoded in ``images.workers`` processes (0: in this one) a few batches ahead, pinned on CUDA."""
    cuda = torch.device(device).type == "cuda"
    lists = [[int(i) for i in batch] for batch in order]
    if not lists:
        return
    loader = torch.utils.data.DataLoader(
        _Decoded(images), batch_sampler=lists, num_workers=images.workers, pin_memory=cuda,
        persistent_workers=False, **({"prefetch_factor": 2} if images.workers > 0 else {}))
    for batch in loader:
        yield batch.to(device, non_blocking=cuda)


def is_lazy(x: object) -> bool:
    return isinstance(x, LazyImages)
