"""Worker for tests/test_distributed.py, started by torchrun (2 processes, gloo, CPU).

usage: dist_worker.py OUT_DIR CRASH_AFTER DDP
  * runs a sharded extraction with a fake, deterministic ``compute`` over KEYS and appends
    every key it computes to OUT_DIR/log-rank<r>.txt;
  * if CRASH_AFTER > 0, rank 1 dies with os._exit (no cleanup, like SIGKILL) after computing
    that many keys;
  * if DDP == 1, takes two SGD steps of a linear model through prepare_ddp (one batch from
    the prepared DataLoader, one split by hand with shard_items) and saves the parameters
    to OUT_DIR/ddp-rank<r>.safetensors.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from difffeat.distributed import dist_info, prepare_ddp, shard_items
from difffeat.shards import Record, run_sharded

KEYS = [f"img-{i:03d}" for i in range(23)]
SHARD_SIZE, BATCH_SIZE = 4, 2


def fake_features(key: str) -> dict[str, torch.Tensor]:
    """Deterministic per-key tensors standing in for an extractor's output."""
    g = torch.Generator().manual_seed(int(key.split("-")[1]))
    return {"up.1": torch.randn(3, 2, 2, generator=g).half(), "mid": torch.randn(5, generator=g)}


def ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)


def ddp_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def main(out: Path, crash_after: int, ddp: bool) -> None:
    info = dist_info()
    log = out / f"log-rank{info.rank}.txt"
    done = 0

    def compute(keys: list[str]) -> dict[str, Record]:
        nonlocal done
        if crash_after and info.rank == 1 and done >= crash_after:
            os._exit(1)
        with open(log, "a") as f:
            f.writelines(k + "\n" for k in keys)
        done += len(keys)
        return {k: Record(fake_features(k), {"n": int(k.split("-")[1])}) for k in keys}

    run_sharded(out / "feats", KEYS, compute, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, run_meta={"model": "fake"})
    if ddp:
        from safetensors.torch import save_file

        x, y = ddp_data()
        model = ddp_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4 // info.world_size)
        acc, model, opt, loader = prepare_ddp(model, opt, loader, cpu=True)
        xb, yb = next(iter(loader))  # step 1, through the loader: each rank gets half of samples 0-3
        mine = shard_items([4, 5, 6, 7], acc.process_index, acc.num_processes)  # step 2, a trainer's own batches
        for bx, by in ((xb, yb), (x[mine], y[mine])):
            opt.zero_grad()
            acc.backward(torch.nn.functional.mse_loss(model(bx), by))
            opt.step()
        params = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
        params["seen_x"] = xb.clone()
        save_file(params, str(out / f"ddp-rank{info.rank}.safetensors"))
        acc.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1")
