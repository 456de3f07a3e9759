"""A device-resident loader: one uint8 tensor per split on the training device, augmented per batch there.

No worker processes and no per-image Python work: a batch is gathered from the resident tensor, randomly
cropped (zero padding 4) and flipped with tensor ops, then normalised. The order and the augmentation of
batch `k` of epoch `e` depend only on (seed, e, k), so a run resumed mid-epoch sees exactly the batches it
would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def subset_per_class(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first `n` examples of each class, in dataset order (n <= 0: all)."""
    if n <= 0:
        return torch.arange(len(labels))
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    first = torch.searchsorted(sorted_labels, sorted_labels, right=False)  # start of each class block
    rank = torch.arange(len(labels)) - first
    return torch.sort(order[rank < n]).values


class DeviceLoader:
    """Iterate (images float (B, 3, H, W), labels (B,), dataset indices (B,)) over a resident split."""

    def __init__(
        self,
        images: torch.Tensor,  # uint8 (N, 3, H, W)
        labels: torch.Tensor,  # int64 (N,)
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        train: bool,
        seed: int = 0,
        pad: int = 4,
        drop_last: bool | None = None,
        channels_last: bool = False,
        shard: tuple[int, int] = (0, 1),  # (rank, world): this process's rows of every global batch
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.device, self.train, self.seed, self.pad = batch_size, device, train, seed, pad
        self.drop_last = train if drop_last is None else drop_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.epoch = 0
        self.rank, self.world = shard
        if train and batch_size % self.world:
            raise ValueError(f"data.batch_size: {batch_size} does not divide among {self.world} processes")

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _generator(self, *key: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(hash((self.seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF)
        return g

    def order(self, epoch: int) -> torch.Tensor:
        if not self.train:
            return torch.arange(len(self.labels), device=self.device)
        return torch.randperm(len(self.labels), generator=self._generator(epoch), device=self.device)

    def augment(self, x: torch.Tensor, g: torch.Generator, part: slice = slice(None), n: int = 0) -> torch.Tensor:
        """Random crop with zero padding + horizontal flip. x: uint8 (B, C, H, W): the rows `part` of a batch of
        `n` (default: all of x), with the random draws made for the whole batch."""
        b, _, h, w = x.shape
        n = n or b
        p = self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * p + 1, (n,), generator=g, device=x.device)[part]
        dx = torch.randint(0, 2 * p + 1, (n,), generator=g, device=x.device)[part]
        flip = (torch.rand(n, generator=g, device=x.device) < 0.5)[part]
        cols = torch.arange(w, device=x.device)
        cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # (B, W)
        rows = torch.arange(h, device=x.device) + dy[:, None]  # (B, H)
        bi = torch.arange(b, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2)

    def batches(
        self, epoch: int, start: int = 0, shard: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches of `epoch`, beginning at batch `start` (for resuming mid-epoch): this process's shard of
        each (training) batch, or with shard=False the whole batch."""
        order = self.order(epoch)
        for k in range(start, len(self)):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            part, n = slice(None), len(idx)
            if shard and self.train and self.world > 1:
                per = n // self.world
                part = slice(self.rank * per, (self.rank + 1) * per)
                idx = idx[part]
            x = self.images[idx]
            if self.train:
                x = self.augment(x, self._generator(epoch, k), part, n)
            x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            yield x, self.labels[idx], idx

    def __iter__(self):
        yield from self.batches(self.epoch)
