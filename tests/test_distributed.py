"""Data-parallel extraction and DDP training (issue #7): exact sharding, atomic shards, resume, merge."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import dist_worker as W
from difffeat.distributed import DistInfo, dist_info, rank_device, rank_share, shard_items
from difffeat.errors import BadInputError, DiffFeatError
from difffeat.shards import INDEX, Record, ShardedFeatures, ShardWriter, merge_index, plan_shards, run_sharded


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every visible file in a folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def fake_run(out: Path, info: DistInfo, log: list[str], fail_after: int | None = None, keys=W.KEYS) -> object:
    def compute(batch: list[str]) -> dict[str, Record]:
        if fail_after is not None and len(log) >= fail_after:
            raise KeyboardInterrupt  # a kill: the shard in memory is lost, nothing is written
        log.extend(batch)
        return {k: Record(W.fake_features(k), {"n": int(k.split("-")[1])}) for k in batch}

    return run_sharded(out, keys, compute, shard_size=W.SHARD_SIZE, batch_size=W.BATCH_SIZE,
                       run_meta={"model": "fake"}, info=info)


# ------------------------------------------------------------------ pure sharding
@pytest.mark.parametrize("n", [0, 1, 7, 23, 64])
def test_strided_sharding_covers_every_item_exactly_once(n: int) -> None:
    items = list(range(n))
    for world in (1, 2, 3, 5, 8, 13):
        parts = [shard_items(items, r, world) for r in range(world)]
        assert sorted(x for p in parts for x in p) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        for bs in (1, 3, 4):
            shares = [rank_share(items, bs, DistInfo(r, world)) for r in range(world)]
            assert sorted(x for s in shares for x in s) == items
            # re-chunking a rank's share gives whole global batches: batch composition is world-size free
            global_batches = [items[i : i + bs] for i in range(0, n, bs)]
            local = [s[i : i + bs] for s in shares for i in range(0, len(s), bs)]
            assert sorted(local) == sorted(global_batches)


def test_shard_plan_is_sorted_numbered_and_rejects_bad_input() -> None:
    shards = plan_shards(["c", "a", "e", "b", "d"], 2)
    assert [(s.name, s.keys) for s in shards] == [("shard-000000", ("a", "b")), ("shard-000001", ("c", "d")), ("shard-000002", ("e",))]
    with pytest.raises(BadInputError, match="occurs twice"):
        plan_shards(["a", "b", "a"], 2)
    with pytest.raises(BadInputError, match="shard size"):
        plan_shards(["a"], 0)
    with pytest.raises(BadInputError, match="not in a world"):
        shard_items([1, 2], 2, 2)


def test_rank_discovery_from_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    assert dist_info() == DistInfo(0, 1, 0) and dist_info().is_main
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_info() == DistInfo(5, 8, 1) and not dist_info().is_main
    assert rank_device("cpu") == "cpu" and rank_device("cuda:3") == "cuda:3"
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(BadInputError, match="RANK=8, WORLD_SIZE=8"):
        dist_info()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(BadInputError, match="not an integer"):
        dist_info()


# ------------------------------------------------------------------ shards, resume, merge (in process)
@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean single-process run (rank 0 of 1)."""
    out = tmp_path_factory.mktemp("ref")
    log: list[str] = []
    res = fake_run(out, DistInfo(0, 1), log)
    assert log == W.KEYS and res.merged is not None and res.merged.num_items == 23  # type: ignore[attr-defined]
    return out


def test_outputs_are_byte_identical_for_any_world_size(reference: Path, tmp_path: Path) -> None:
    for world in (2, 3, 7):
        out, log = tmp_path / f"w{world}", []
        results = [fake_run(out, DistInfo(r, world), log) for r in range(world)]
        assert sorted(log) == W.KEYS  # every key computed once over all ranks
        busy = min(world, 6)  # 6 shards: with 7 ranks one has nothing to do
        merged = [r.merged is not None for r in results]  # type: ignore[attr-defined]
        assert merged == [False] * (busy - 1) + [True] * (world - busy + 1)  # whoever finds all shards merges
        assert digests(out) == digests(reference)  # shards, per-shard indexes, plan and merged index


def test_merged_index_reads_back_every_image(reference: Path) -> None:
    feats = ShardedFeatures(reference)
    assert list(feats) == W.KEYS and feats.run_meta == {"model": "fake"}
    for k in W.KEYS:
        got, want = feats[k], W.fake_features(k)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) and got[n].dtype == want[n].dtype for n in want)
        assert feats.meta(k) == {"n": int(k.split("-")[1])}
    line = (reference / INDEX).read_text().splitlines()[5]
    assert line == '{"key":"img-005","meta":{"n":5},"shard":"shard-000001.safetensors","tensors":{"mid":"img-005/mid","up.1":"img-005/up.1"}}'


def test_resume_after_kill_mid_shard_loses_and_duplicates_nothing(reference: Path, tmp_path: Path) -> None:
    out, first = tmp_path / "run", []
    with pytest.raises(KeyboardInterrupt):  # rank 0 of 2 dies during its second shard (shard 2)
        fake_run(out, DistInfo(0, 2), first, fail_after=6)
    assert first == list(W.KEYS[0:4]) + list(W.KEYS[8:10])
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.jsonl", "shard-000000.safetensors"]
    stale = out / ".shard-000002.safetensors.k1ll3d.tmp"  # a kill during the write leaves a tmp file
    stale.write_bytes(b"partial")
    second: list[str] = []
    assert fake_run(out, DistInfo(1, 2), second).merged is None  # rank 1 finishes its shards
    assert stale.exists()  # not rank 1's shard: only its owner may clean it
    resumed = fake_run(out, DistInfo(0, 2), second)  # the restarted rank 0 skips shard 0
    assert resumed.skipped == 4 and resumed.computed == 8 and resumed.merged is not None  # type: ignore[attr-defined]
    assert not stale.exists()
    done_before = set(W.KEYS[0:4])
    assert sorted(second) == sorted(set(W.KEYS) - done_before) and len(second) == len(set(second))
    assert digests(out) == digests(reference)


def test_merge_refuses_incomplete_or_foreign_runs(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "part"
    fake_run(out, DistInfo(0, 2), [])
    assert merge_index(out, allow_incomplete=True) is None
    with pytest.raises(DiffFeatError, match="3 of 6 shards are not written yet .first: shard-000001"):
        merge_index(out)
    with pytest.raises(BadInputError, match="other inputs or settings .keys_sha256, num_items differ"):
        fake_run(out, DistInfo(1, 2), [], keys=W.KEYS[:-1])
    with pytest.raises(BadInputError, match="shard_size differ"):
        ShardWriter(out, W.KEYS, 5, {"model": "fake"}, DistInfo(0, 1))
    with pytest.raises(BadInputError, match="could mix old and new shards"):  # ranks never wait for each other
        ShardWriter(out, W.KEYS, 5, {"model": "fake"}, DistInfo(0, 2), overwrite=True)
    # a tampered shard index (a key moved to another shard) is caught
    (out / "shard-000002.jsonl").write_text((reference / "shard-000001.jsonl").read_text())
    with pytest.raises(DiffFeatError, match="shard-000002.jsonl lists 'img-004' in shard-000001.safetensors"):
        fake_run(out, DistInfo(1, 2), [])  # the rank that finishes last merges, and finds the damage


# ------------------------------------------------------------------ real processes (gloo, CPU)
def _rank_main(rank: int, port: int, out: Path, crash_after: int, ddp: bool) -> None:
    # what torchrun does for each worker: set the launcher variables, then run the script
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    W.main(out, crash_after, ddp)


def launch_two(out: Path, crash_after: int, ddp: bool) -> bool:
    """Run dist_worker.main in 2 processes; like torchrun, one dying stops the other. True if all exited 0.

    Processes are forked (the parent has torch imported already): spawning or torchrun would
    import torch again in each worker, which costs ~7 s per launch on a 2-core machine.
    ``torchrun --nproc_per_node 2 tests/dist_worker.py OUT 0 1`` runs the same workers.
    """
    import socket

    import accelerate  # noqa: F401  (imported once here rather than in each worker)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        torch.multiprocessing.start_processes(_rank_main, args=(port, out, crash_after, ddp), nprocs=2, start_method="fork")
    except torch.multiprocessing.ProcessExitedException:
        return False
    return True


def test_two_processes_crash_resume_and_ddp(reference: Path, tmp_path: Path) -> None:
    # launch 1: rank 1 is killed (os._exit) in the middle of its first shard; rank 0 is stopped with it
    assert not launch_two(tmp_path, crash_after=2, ddp=False)
    finished = {json.loads(line)["key"] for p in (tmp_path / "feats").glob("shard-*.jsonl") for line in p.read_text().splitlines()}
    assert not (tmp_path / "feats" / INDEX).exists() and len(finished) < len(W.KEYS)
    for r in (0, 1):
        (tmp_path / f"log-rank{r}.txt").unlink(missing_ok=True)
    # launch 2: resume, then two DDP steps
    assert launch_two(tmp_path, crash_after=0, ddp=True)
    second = {r: (p.read_text().split() if (p := tmp_path / f"log-rank{r}.txt").exists() else []) for r in (0, 1)}
    redone = second[0] + second[1]
    assert sorted(redone) == sorted(set(W.KEYS) - finished) and len(redone) == len(set(redone))
    for r in (0, 1):  # each rank computed only keys of its own shards (shard k -> rank k % 2)
        assert all((W.KEYS.index(k) // W.SHARD_SIZE) % 2 == r for k in second[r])
    assert digests(tmp_path / "feats") == digests(reference)
    assert not list((tmp_path / "feats").glob(".shard-*.tmp"))  # what the kill left was cleaned

    # DDP: both ranks hold the same parameters, equal to full-batch steps in one process
    from safetensors.torch import load_file

    p0, p1 = (load_file(str(tmp_path / f"ddp-rank{r}.safetensors")) for r in (0, 1))
    x, y = W.ddp_data()
    assert not torch.equal(p0.pop("seen_x"), p1.pop("seen_x"))  # the ranks saw different samples
    model = W.ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for sl in (slice(0, 4), slice(4, 8)):  # the same two global batches, in one process
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[sl]), y[sl]).backward()
        opt.step()
    for name, ref in model.state_dict().items():
        assert torch.equal(p0[name], p1[name])
        torch.testing.assert_close(p0[name], ref)
        assert not torch.allclose(ref, W.ddp_model().state_dict()[name])  # the step did move it


# ------------------------------------------------------------------ the real extractor (tiny SD)
def test_sharded_extract_matches_the_extractor(tiny_sd, image_folder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import difffeat
    from difffeat.io import list_images, load_image
    from difffeat.shards import extract_folder_sharded

    (image_folder / "bad.png").write_bytes(b"\x89PNG not really")
    ex = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.1", "mid"], timesteps=[261], ensemble=1, resolution=64)
    first = extract_folder_sharded(ex, image_folder, tmp_path, shard_size=3, batch_size=3, info=DistInfo(0, 2))
    assert first.merged is None and first.computed == 3  # rank 0 of 2: shard 0 (a.png, bad.png, c.png)
    with pytest.raises(DiffFeatError, match=r"1 of 6 images failed \(first: bad.png\)"):  # rank 1 merges, reports all
        extract_folder_sharded(ex, image_folder, tmp_path, shard_size=3, batch_size=3, info=DistInfo(1, 2))
    feats = ShardedFeatures(tmp_path)
    keys = ["a.png", "c.png", "d16.png", "e.jpg", "sub/b.jpg"]
    assert list(feats) == ["a.png", "bad.png", "c.png", "d16.png", "e.jpg", "sub/b.jpg"]
    assert feats.run_meta["layers"] == ["up.1", "mid"] and feats.run_meta["save_dtype"] == "fp16"
    with pytest.raises(BadInputError, match="bad.png failed during extraction: cannot read image"):
        feats["bad.png"]
    paths = [p for p in list_images(image_folder) if p.name != "bad.png"]
    images = [load_image(p) for p in paths]
    want = ex(ex.prepare(images))  # all five in one batch: per-image noise makes batching irrelevant
    for i, (key, path) in enumerate(zip(keys, paths)):
        got = feats[key]
        assert got.keys() == want.keys() and got["up.1"].dtype == torch.float16
        for name in want:
            torch.testing.assert_close(got[name], want[name][i].half(), rtol=2e-3, atol=2e-3)
        assert feats.meta(key) == {"image": str(path), "original_size": list(images[i].size), "input_size": [64, 64]}
