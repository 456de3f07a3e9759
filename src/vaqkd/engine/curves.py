"""TensorBoard curves beside metrics.jsonl (optional: `pip install 'vaqkd[tensorboard]'`, `vaqkd train
--tensorboard`): each epoch's line — every loss part, train and test top-1, lr, throughput — as scalars under
`<run>/tensorboard/`, written by rank 0. metrics.jsonl stays the record; the curves are for watching a run."""

from __future__ import annotations

from pathlib import Path

TAGS = {"train_loss": "loss/train", "test_loss": "loss/test", "train_top1": "top1/train", "test_top1": "top1/test",
        "lr": "lr", "img_per_s": "throughput/img_per_s"}  # fmt: skip


class Curves:
    """Writes each metrics row as TensorBoard scalars at its epoch."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tensorboard needs tensorboard: pip install 'vaqkd[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def add(self, row: dict) -> None:
        epoch = row["epoch"]
        for key, tag in TAGS.items():
            if key in row:
                self.writer.add_scalar(tag, row[key], epoch)
        for name, value in row.get("parts", {}).items():
            self.writer.add_scalar(f"parts/{name}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
