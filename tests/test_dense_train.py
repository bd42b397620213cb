"""Dense tasks end to end on the tiny SD: train -> save -> load -> predict -> eval, resume,
online augmentation, zero-shot K-means, configs, and the mmseg plugin."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import tiny_models

from difffeat.cli import cli, load_task_commands
from difffeat.errors import BadInputError, CheckpointMismatchError
from difffeat.heads import load_head
from difffeat.tasks.dense_config import load_train_config
from difffeat.tasks.dense_train import augment, load_train_state, lr_factor, save_train_state, train_dense

load_task_commands()
N = 6  # images in the generated folder (one extraction batch)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Images split into a red left part and a blue right part, with masks, depth and edges."""
    root = tmp_path_factory.mktemp("dense-data")
    for d in ("images", "masks", "depth", "edges"):
        (root / d).mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        img, x0 = tiny_models.two_region_image(rng)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        mask = np.zeros((64, 64), np.uint8)
        mask[:, :x0] = 1
        m = Image.fromarray(mask, mode="P")
        m.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        m.save(root / "masks" / f"im{i}.png")
        depth = np.where(mask == 1, 2000, 4000).astype(np.uint16)  # 2 m red, 4 m blue
        Image.fromarray(depth).save(root / "depth" / f"im{i}.png")
        edges = np.zeros((64, 64), np.uint8)
        edges[:, x0 - 1 : x0 + 1] = 255
        Image.fromarray(edges).save(root / "edges" / f"im{i}.png")
    (root / "classes.txt").write_text("water\nfire\n")
    return root


@pytest.fixture(scope="module")
def common(tiny_sd_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("feature-cache")
    return [f"backbone.model={tiny_sd_dir}", "backbone.resolution=64", f"train.batch_size={N}", "train.lr=0.01",
            "train.warmup_steps=0", "train.device=cpu", "train.cache_flip=false", f"train.cache_dir={cache}",
            "train.log_every=1"]


@pytest.fixture(scope="module")
def ex(tiny_sd):
    """The extractor the configs below describe, on the session's tiny SD (probed once)."""
    from difffeat.extractor import FeatureExtractor

    return FeatureExtractor(tiny_sd, layers=["up.0.res.1", "up.1.attn.1", "up.2.attn.1", "up.3"], timesteps=[1],
                            resolution=64, resize="resize")


@pytest.fixture(scope="module")
def seg_run(data, common, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg-run")
    r = invoke("train", "seg", data, "-o", out, *common, "train.epochs=5", f"data.val={data}",
               "head.args={fpn_channels: 16, head_channels: 16}")
    assert r.exit_code == 0, r.output
    return out


def _epochs(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "train_loss" in x]


def test_seg_train_save_load_predict_eval(seg_run, data, tiny_sd_dir, tmp_path):
    epochs = _epochs(seg_run)
    assert len(epochs) == 5 and epochs[-1]["train_loss"] < 0.8 * epochs[0]["train_loss"]  # the loss falls
    cfg = json.loads((seg_run / "head" / "head.json").read_text())
    assert cfg["task"] == "seg" and cfg["classes"] == ["water", "fire"] and cfg["image_size"] == 64
    assert cfg["backbone"]["layers"] == ["up.0.res.1", "up.1.attn.1", "up.2.attn.1", "up.3"]
    assert cfg["backbone"]["timesteps"] == [1]
    load_head(seg_run / "head", expect_backbone={"preset": str(tiny_sd_dir), "timesteps": [1]})
    with pytest.raises(CheckpointMismatchError, match="timesteps"):
        load_head(seg_run / "head", expect_backbone={"timesteps": [261]})

    # predict a folder: original resolution, one corrupt file reported, exit non-zero, resumable
    imgs = tmp_path / "new"
    shutil.copytree(data / "images", imgs)
    Image.fromarray(np.full((64, 96, 3), (220, 40, 30), np.uint8)).save(imgs / "wide.png")
    (imgs / "broken.png").write_bytes(b"not an image")
    preds = tmp_path / "pred"
    r = invoke("segment", imgs, "--head", seg_run / "head", "-o", preds, "-b", N + 2)
    assert r.exit_code != 0 and "broken.png" in r.output and f"1 of {N + 2} images failed" in r.output
    mask = Image.open(preds / "wide.png")
    assert mask.mode == "P" and mask.size == (96, 64)
    assert Image.open(preds / "wide_overlay.png").size == (96, 64)
    r = invoke("segment", imgs, "--head", seg_run / "head", "-o", preds)
    assert f"{N + 1} of {N + 2} images already done" in r.output
    r = invoke("segment", imgs, "--head", seg_run / "head", "-o", preds, "-t", 261)
    assert r.exit_code != 0 and "timesteps" in r.output

    # predictions saved as files score like the head's in-training validation
    r = invoke("eval", "seg", data, "--pred", preds, "-o", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["mIoU"] == pytest.approx(epochs[-1]["val_mIoU"], abs=1.0)
    assert set(m["IoU"]) == {"water", "fire"} and "mIoU" in r.output


def test_resume_continues_and_refuses_other_settings(seg_run, data, common, ex):
    same = [*common, f"data.val={data}", "head.args={fpn_channels: 16, head_channels: 16}"]
    said = []
    train_dense("seg", data, seg_run, load_train_config("seg", None, [*same, "train.epochs=6"]), echo=said.append, ex=ex)
    assert said[0].startswith("resuming") and "after epoch 5" in said[0]
    epochs = _epochs(seg_run)
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5, 6]
    info = json.loads((seg_run / "train_state.json").read_text())
    assert info["epoch"] == 6 and info["step"] == 6
    r = invoke("train", "seg", data, "-o", seg_run, *same, "train.epochs=6")
    assert r.exit_code == 0 and "already finished 6 epochs" in r.output
    r = invoke("train", "seg", data, "-o", seg_run, *same, "train.epochs=7", "train.lr=0.5")
    assert r.exit_code != 0 and "train.lr" in r.output and "--overwrite" in r.output


def _train(task, data, common, out, ex, *extra):
    cfg = load_train_config(task, None, [*common, *extra])
    result = train_dense(task, data, out, cfg, echo=lambda m: None, ex=ex)
    losses = [e["train_loss"] for e in result["epochs"]]
    assert all(math.isfinite(x) for x in losses)
    return result, losses


def test_depth_head_learns_and_writes_16bit_depth(data, common, ex, seg_run, tmp_path):
    result, losses = _train("depth", data, common, tmp_path / "run", ex, "train.epochs=4",
                            "head.args={embed_channels: 16, deconv_channels: 8, out_channels: 8, max_depth: 10.0}")
    assert losses[-1] < losses[0]
    out = tmp_path / "pred"
    r = invoke("depth", data / "images", "--head", result["checkpoint"], "-o", out, "-b", N)
    assert r.exit_code == 0, r.output
    arr = np.asarray(Image.open(out / "im0.png"))
    assert arr.shape == (64, 64) and arr.dtype == np.uint16
    assert 0 < arr.min() and arr.max() < 10_000  # millimetres (depth_scale 1000), within max_depth
    assert (out / "im0_color.png").exists()


def test_edge_head_learns_and_predicts_probabilities(data, common, ex, seg_run, tmp_path):
    from difffeat.tasks.dense_predict import DensePredictor, write_edges

    result, losses = _train("edges", data, common, tmp_path / "run", ex, "train.epochs=4", "head.args={hidden: 8}",
                            f"data.val={data}", "data.thresholds=5")
    assert losses[-1] < losses[0]
    assert all(0.0 <= e["val_ODS"] <= 1.0 and 0.0 <= e["val_AP"] <= 1.0 for e in result["epochs"])
    p = DensePredictor(load_head(result["checkpoint"]), ex)
    image = Image.open(data / "images" / "im0.png").convert("RGB").resize((80, 48))
    logits = p.predict([image])[0]
    assert logits.shape == (1, 48, 80)  # original resolution
    write_edges(tmp_path / "e.png", torch.sigmoid(logits[0]).numpy(), nms=True)
    png = Image.open(tmp_path / "e.png")
    assert png.mode == "L" and png.size == (80, 48)


def test_sliding_window_covers_large_images_and_matches_whole_image_at_training_size(seg_run, data, ex):
    from difffeat.tasks.dense_predict import DensePredictor

    p = DensePredictor(load_head(seg_run / "head"), ex)
    image = Image.open(data / "images" / "im1.png").convert("RGB")
    whole = p.predict([image])[0]
    assert torch.allclose(p.predict_sliding(image), whole, atol=1e-5)  # one window = the whole image
    wide = image.resize((160, 80))
    out = p.predict_sliding(wide, overlap=0.5)  # scaled to 64 x 128: two windows
    assert out.shape == (2, 80, 160) and torch.isfinite(out).all()


def test_online_mode_trains_with_augmentation(data, common, ex, tmp_path):
    result, _ = _train("seg", data, common, tmp_path / "run", ex, "train.mode=online", "train.epochs=1",
                       "train.crop_size=64", "head.kind=probe")
    cfg = load_head(result["checkpoint"]).config
    assert cfg["head"]["kind"] == "probe" and cfg["head"]["args"] == {"num_outputs": 2}  # no FPN defaults leak in
    assert cfg["extra"]["train_config"]["train"]["mode"] == "online"


def test_augment_crops_pads_and_flips_image_and_label_together():
    g = torch.Generator().manual_seed(0)
    image = torch.zeros(3, 40, 60)
    image[0, :, :30] = 1.0  # left half red
    target = torch.zeros(40, 60, dtype=torch.long)
    target[:, :30] = 1
    for _ in range(5):
        im, t = augment(image, target, "seg", 64, (0.5, 0.8), True, g, 255)
        assert im.shape == (3, 64, 64) and t.shape == (64, 64)
        valid = t != 255
        assert (t[valid] == (im[0][valid] > 0.5).long()).float().mean() > 0.97  # still aligned
        assert (t == 255).any()  # scale < 1: padded with the ignore index


def test_zero_shot_kmeans_separates_two_regions(tiny_pixel_dir, tmp_path):
    # random-weight UNets do not encode colour semantics; the first conv of the tiny pixel
    # model on clean input does, which isolates what is tested: clustering, upsampling, ids
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, :32] = (230, 30, 30)
    img[:, 32:] = (20, 40, 220)
    Image.fromarray(img).save(imgs / "two.png")
    r = invoke("segment", imgs, "--zero-shot", 2, "-m", tiny_pixel_dir, "-l", "conv_in", "--noise", "clean",
               "--resolution", 64, "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    seg = np.asarray(Image.open(tmp_path / "o" / "two.png"))
    assert set(np.unique(seg)) == {0, 1} and seg[0, 0] == 0  # ids by first appearance
    truth = (np.arange(64) >= 32)[None].repeat(64, 0)
    assert (seg == truth).mean() > 0.9


def test_config_overrides_are_checked(tmp_path):
    cfg = load_train_config("depth", None, ["train.lr=3e-4", "backbone.layers=[up.1]", "head.aggregator.width=64"])
    assert cfg["train"]["lr"] == 3e-4 and cfg["backbone"]["layers"] == ["up.1"]
    assert cfg["head"]["aggregator"] == {"width": 64} and cfg["loss"]["lambd"] == 0.5
    with pytest.raises(KeyError, match="unknown config key 'train.lrr'"):
        load_train_config("seg", None, ["train.lrr=1"])
    with pytest.raises(BadInputError, match="not key=value"):
        load_train_config("seg", None, ["train.lr"])
    user = tmp_path / "my.yaml"
    user.write_text("task: seg\ntrain: {epochs: 3}\nhead: {args: {head_channels: 64}}\n")
    cfg = load_train_config("seg", user, ["train.epochs=4"])
    assert cfg["train"]["epochs"] == 4 and cfg["head"]["args"] == {"fpn_channels": 256, "head_channels": 64, "dropout": 0.1}
    user.write_text("task: depth\n")
    with pytest.raises(BadInputError, match="is a 'depth' config"):
        load_train_config("seg", user)


def test_lr_schedule_and_optimizer_state_roundtrip(tmp_path):
    cfg = {"warmup_steps": 4, "schedule": "poly", "poly_power": 1.0, "min_lr_ratio": 0.0}
    assert [lr_factor(s, 14, cfg) for s in (0, 3, 4, 9, 14)] == pytest.approx([0.25, 1.0, 1.0, 0.5, 0.0])
    cos = dict(cfg, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(9, 14, cos) == pytest.approx(0.1 + 0.9 * 0.5)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_train_state(tmp_path, opt, {"epoch": 2, "step": 7})
    opt2 = torch.optim.AdamW(net.parameters(), lr=0.1)
    assert load_train_state(tmp_path, opt2) == {"epoch": 2, "step": 7}
    for a, b in zip(opt.state.values(), opt2.state.values()):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_mmseg_plugin_registers_backbone(tiny_sd_dir):
    import difffeat.mmseg_plugin as plugin  # importing never fails, with or without mmseg

    if not plugin.available():
        pytest.skip("mmsegmentation/mmengine are not installed (pip install 'difffeat[mmseg]'); plugin not registered")
    from mmseg.registry import MODELS

    bb = MODELS.build(dict(type="DiffFeatBackbone", model=str(tiny_sd_dir), layers=["up.1", "up.3"], timesteps=[1],
                           dtype="fp32", device="cpu"))
    x = (torch.rand(1, 3, 64, 64) * 255 - torch.tensor(plugin.MMSEG_MEAN).view(1, 3, 1, 1)) / torch.tensor(plugin.MMSEG_STD).view(1, 3, 1, 1)
    outs = bb(x)
    assert [o.shape[-1] for o in outs] == [8, 4]  # finest first
