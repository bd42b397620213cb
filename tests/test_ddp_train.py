"""DDP head training (issue #7): ``train_dense`` in 2 processes (gloo, CPU) equals one process.

The 2 ranks are forked from the test process, as in tests/test_distributed.py: each sets the
launcher variables that torchrun sets and calls ``train_dense`` with the extractor already
loaded here. ``torchrun --nproc_per_node 2 --no-python difffeat train seg ...`` runs the same.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models

N, BATCH = 7, 3  # global batches of 3, 3, 1: unequal parts (2 + 1) and, last, a rank without a sample


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two-class masks with a varying number of ignored pixels (so ranks' pixel counts differ)."""
    root = tmp_path_factory.mktemp("ddp-data")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i in range(N):
        img, x0 = tiny_models.two_region_image(rng)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        mask = np.zeros((64, 64), np.uint8)
        mask[:, :x0] = 1
        mask[: 4 * i] = 255  # ignored rows
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    (root / "classes.txt").write_text("water\nfire\n")
    return root


@pytest.fixture(scope="module")
def ex(tiny_sd):  # type: ignore[no-untyped-def]
    from difffeat.extractor import FeatureExtractor

    return FeatureExtractor(tiny_sd, layers=["up.1.attn.1", "up.3"], timesteps=[1], resolution=64, resize="resize")


def config(tiny_sd_dir: Path, data: Path, cache: Path, epochs: int) -> dict:
    from difffeat.tasks.dense_config import load_train_config

    return load_train_config("seg", None, [
        f"backbone.model={tiny_sd_dir}", "backbone.layers=[up.1.attn.1, up.3]", "backbone.timesteps=[1]",
        "backbone.resolution=64", f"train.batch_size={BATCH}", f"train.epochs={epochs}", "train.lr=0.01",
        "train.warmup_steps=2", "train.device=cpu", f"train.cache_dir={cache}", "train.log_every=1", f"data.val={data}",
        "head.args={fpn_channels: 8, head_channels: 8, dropout: 0.0}",  # dropout masks would differ per rank
    ])


def _rank_main(rank: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    import difffeat.tasks.dense_train as T

    data, out, cfg, ex, log = args
    save = T.save_features

    def logged(path, tensors, meta):  # type: ignore[no-untyped-def]
        with open(log / f"cached-rank{rank}.txt", "a") as f:
            f.write(Path(path).name + "\n")
        save(path, tensors, meta)

    T.save_features = logged  # this forked process only
    T.train_dense("seg", data, out, cfg, ex=ex)


def launch_two(*args: object) -> None:
    """``train_dense`` in 2 forked ranks (see tests/test_distributed.py: launch_two); raises if a rank fails."""
    import accelerate  # noqa: F401  (imported once here rather than in each rank)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_rank_main, args=(port, args), nprocs=2, start_method="fork")


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (f,) = (run / "head").glob("*.safetensors")
    return load_file(str(f))


def lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.safetensors")}


def test_two_ranks_train_the_head_of_one_process(tiny_sd_dir: Path, data: Path, ex, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from difffeat.tasks.dense_train import train_dense

    # one process, then 2 ranks: 2 epochs, then a resumed 3rd (3 steps an epoch, the last with one sample)
    ref = tmp_path / "one"
    for epochs in (2, 3):
        train_dense("seg", data, ref, config(tiny_sd_dir, data, tmp_path / "cache-one", epochs), echo=lambda m: None, ex=ex)
    ddp, cache = tmp_path / "two", tmp_path / "cache-two"
    launch_two(data, ddp, config(tiny_sd_dir, data, cache, 2), ex, tmp_path)
    cached = {r: (tmp_path / f"cached-rank{r}.txt").read_text().split() for r in (0, 1)}
    assert len(cached[0]) == 8 and len(cached[1]) == 6  # units of 3 of the 14 (image, flip) files: 0, 2, 4 | 1, 3
    assert not set(cached[0]) & set(cached[1])  # no file extracted by both ranks (val images = train images)
    assert sorted(cached[0] + cached[1]) == sorted(digests(cache))  # and every one extracted
    assert digests(cache) == digests(tmp_path / "cache-one")  # the same extraction batches as one process
    launch_two(data, ddp, config(tiny_sd_dir, data, cache, 3), ex, tmp_path)
    assert all(len((tmp_path / f"cached-rank{r}.txt").read_text().split()) == len(cached[r]) for r in (0, 1))  # reused

    # rank 0 alone wrote: one line per step and epoch, once, with the one-process losses and metrics
    assert (ddp / "train_state.json").exists() and not list(ddp.glob(".*.tmp")) and not list((ddp / "head").glob(".*"))
    got, want = lines(ddp), lines(ref)
    assert [sorted(x) for x in got] == [sorted(x) for x in want] and len(want) == 3 * 3 + 3
    for a, b in zip(got, want):
        assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
        for k in ("loss", "train_loss", "lr", "val_mIoU"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    assert json.loads((ddp / "head" / "head.json").read_text()).keys() == json.loads((ref / "head" / "head.json").read_text()).keys()

    # the head: N ranks x their parts of each batch == one process x the batch
    w1, w2 = weights(ref), weights(ddp)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=3e-6)  # seen: max |diff| 9.4e-7, |w| <= 1
