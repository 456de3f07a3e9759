"""Run under torchrun by tests/test_distributed.py: a few steps of a config, then every rank saves what it
holds (student parameters and buffers, objective state) to OUT/rank<r>.pt. With KILL_RANK and KILL_AT_STEP set,
that rank kills itself (SIGKILL) when the run reaches that step."""

import os
import signal
import sys
from pathlib import Path

import torch

from vaqkd import dist
from vaqkd.config import load_config
from vaqkd.engine.build import prepare
from vaqkd.engine.setup import resolve_device
from vaqkd.engine.train import end_epoch, fold_stretch, train_stretch


def main() -> None:
    config, run_dir, out, steps, *sets = sys.argv[1:]
    cfg = load_config(config, sets)
    dist.init(resolve_device(cfg.train.device))
    run = prepare(cfg, Path(run_dir), False, print if dist.is_main() else (lambda _: None))
    kill_rank, kill_at = int(os.environ.get("KILL_RANK", "-1")), int(os.environ.get("KILL_AT_STEP", "-1"))
    while run.state["step"] < int(steps):
        if dist.rank() == kill_rank and run.state["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        stretch = train_stretch(run, False, int(steps))
        fold_stretch(run, stretch)
        if run.state["step"] % run.steps_per_epoch:
            run.checkpoint()
        else:
            end_epoch(run, lambda _: None)
    Path(out).mkdir(parents=True, exist_ok=True)
    held = {"model": run.model.state_dict(), "objective": run.objective.state_dict()}
    torch.save(held, f"{out}/rank{dist.rank()}.pt")
    dist.shutdown()


if __name__ == "__main__":
    main()
