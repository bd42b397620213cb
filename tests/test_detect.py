"""DDIM inversion/reconstruction, DIRE maps, detectors and the detection CLI (tiny models, CPU)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageFilter
from torch import nn

import difffeat
from difffeat.errors import BadInputError, DiffFeatError
from difffeat.heads.aeroblade import Autoencoder, VGGLayer2Distance, aeroblade_distances, load_autoencoder, whole_image
from difffeat.heads.ddim import ddim_invert, ddim_timesteps, invert_and_reconstruct, to_eps
from difffeat.heads.dire import DireSettings, calibrate, compute_dire, fit_square, load_dire, save_dire
from tests.tiny_models import GaussianDenoiser

FIXTURES = Path(__file__).parent / "fixtures"


def _golden(name: str) -> dict[str, torch.Tensor]:
    """Golden numbers from the reference code (how each was made: the file's metadata)."""
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / name))


def _pixel(tiny_pixel_dir: Path):  # type: ignore[no-untyped-def]
    """A fresh tiny pixel backbone (tests below swap its denoiser or prediction type)."""
    return difffeat.load_backbone(str(tiny_pixel_dir), dtype="fp32", device="cpu")


class XIndependentDenoiser(nn.Module):
    """A denoiser whose ε depends on t only (wiggly in t); as ``v`` if the backbone predicts v."""

    def __init__(self, bb, shape: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.bb = [bb]  # not a submodule
        self.register_buffer("pattern", torch.randn(shape, generator=torch.Generator().manual_seed(1)))

    def eps(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(0.37 * t.float()).view(-1, 1, 1, 1) * self.pattern

    def forward(self, x, timestep, return_dict=False, **kw):  # type: ignore[no-untyped-def]
        bb = self.bb[0]
        t = timestep
        eps = self.eps(t).expand_as(x)
        if bb.prediction_type == "v_prediction":  # the v whose ε-conversion is exactly `eps`
            a = bb.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
            return ((eps - (1 - a).sqrt() * x.float()) / a.sqrt(),)
        return (eps,)


# --------------------------------------------------------------------------- DDIM
def test_ddim_schedule_matches_guided_diffusion_respacing() -> None:
    assert ddim_timesteps(1000, 20) == list(range(0, 1000, 50))  # ddim20: 0, 50, ..., 950
    assert ddim_timesteps(1000, 3) == [0, 334, 668]  # space_timesteps: smallest stride with exactly 3 steps
    assert ddim_timesteps(1000, 30) == list(range(0, 1000, 34))
    assert ddim_timesteps(1000, 5, "linspace") == [0, 250, 500, 749, 999]
    with pytest.raises(BadInputError, match="steps"):
        ddim_timesteps(1000, 0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_roundtrip_is_exact_when_eps_does_not_depend_on_x(tiny_pixel_dir: Path, prediction: str) -> None:
    """The diffusers pairing queries ε at the step's target timestep, like reconstruction: if
    ε(x, t) = f(t) every inversion step is undone exactly by its reconstruction step (any step
    count); for v-models this also checks the v -> ε conversion."""
    bb = _pixel(tiny_pixel_dir)
    bb.prediction_type = prediction
    bb.denoiser = XIndependentDenoiser(bb, (3, 8, 8))
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    for steps, spacing in ((1, "leading"), (7, "leading"), (20, "linspace")):
        if steps > 1:  # a real trip to noise, not a no-op
            assert (ddim_invert(bb, x0, steps, spacing=spacing, pairing="diffusers") - x0).abs().mean() > 0.1
        rec = invert_and_reconstruct(bb, x0, steps, spacing=spacing, pairing="diffusers")
        assert (rec - x0).abs().max() < 2e-4, (steps, spacing)
    # ... and the conversion itself: ε recovered from the model output
    t = torch.tensor([500, 900])
    out = bb.predict(x0, t, bb.conditioning(batch=2))
    torch.testing.assert_close(to_eps(bb, out, x0, t), bb.denoiser.eps(t).expand_as(x0), atol=1e-4, rtol=0)


def test_ddim_error_falls_with_steps_for_a_random_unet(tiny_pixel_dir: Path) -> None:
    """A random UNet's ε changes with x, so the round trip is approximate; at a fixed inversion
    depth (linspace spacing) the diffusers pairing's error shrinks as the number of steps grows.
    (The guided-diffusion pairing ends at ᾱ = 0 but restarts from ᾱ(t_{n-1}): its error does not.)"""
    bb = _pixel(tiny_pixel_dir)
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    errs = [float((invert_and_reconstruct(bb, x0, n, spacing="linspace", pairing="diffusers") - x0).abs().mean())
            for n in (4, 8, 16, 32)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.5 * errs[0], errs


def test_flow_models_are_refused(tiny_pixel_dir: Path) -> None:
    bb = _pixel(tiny_pixel_dir)
    bb.prediction_type = "flow"
    with pytest.raises(DiffFeatError, match="flow-matching"):
        compute_dire(bb, torch.rand(1, 3, 16, 16), DireSettings(steps=2, resolution=16))


def test_dire_reproduces_compute_dire_golden_maps(tiny_pixel_dir: Path) -> None:
    """DireSettings() is DIRE's compute_dire.py (ddim20, clip_denoised): center_crop_arr, then
    ddim_reverse_sample_loop (ε at the current t, ε re-derived from the clipped x̂_0, steps to
    alphas_cumprod_next) and ddim_sample_loop, maps floored to uint8. Golden maps were made by
    the reference itself on the Gaussian denoiser (benchmarks/fidelity/dire.py; the fixture's
    metadata has the commit and command). The step count and clip_x0 are honoured: 2 denoiser
    calls per step at the reference's timesteps, and unclipped maps differ."""
    g = _golden("dire_golden.safetensors")
    crops = []
    for i in range(4):  # BOX halvings, crop of a wide image, as is, an upsampled small image
        crop = np.asarray(fit_square(Image.fromarray(g[f"image{i}"].numpy()), 16))
        np.testing.assert_array_equal(crop, g[f"crop{i}"].numpy())
        crops.append(crop)
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    bb = _pixel(tiny_pixel_dir)
    bb.denoiser = den = GaussianDenoiser(bb.alphas_cumprod)
    for steps in (20, 3):
        den.calls, den.timesteps = 0, []
        out = compute_dire(bb, x, DireSettings(steps=steps, resolution=16))
        ts = ddim_timesteps(1000, steps)
        assert den.calls == 2 * steps and den.timesteps == ts + ts[::-1]
        torch.testing.assert_close((out.maps * 255).round().to(torch.uint8), g[f"gaussian_ddim{steps}_map"], atol=0, rtol=0)
        torch.testing.assert_close(out.recon * 2 - 1, g[f"gaussian_ddim{steps}_recon11"], atol=1e-5, rtol=0)
    noclip = compute_dire(bb, x, DireSettings(steps=20, resolution=16, clip_x0=False))
    assert (g["gaussian_ddim20_noclip_map"] != g["gaussian_ddim20_map"]).float().mean() > 0.05  # clipping matters here
    torch.testing.assert_close((noclip.maps * 255).round().to(torch.uint8), g["gaussian_ddim20_noclip_map"], atol=1, rtol=0)
    other = compute_dire(bb, x, DireSettings(steps=20, resolution=16, pairing="diffusers"))
    assert ((other.maps * 255).round() - g["gaussian_ddim20_map"].float()).abs().max() >= 5  # another protocol


# --------------------------------------------------------------------------- DIRE maps
def test_dire_maps_pixel_and_latent(tiny_pixel_dir: Path, tiny_sd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bb = _pixel(tiny_pixel_dir)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = compute_dire(bb, x, DireSettings(steps=2, resolution=16))
    assert out.maps.shape == (2, 3, 16, 16) and out.maps.dtype == torch.float32
    assert 0 <= out.maps.min() and out.maps.max() <= 1 and out.maps.max() > 0
    torch.testing.assert_close(out.maps * 255, (out.maps * 255).round())  # on the 8-bit grid
    err = (x - out.recon).abs() * 255  # floored to the grid, as the reference's uint8 cast
    assert ((out.maps * 255 <= err + 1e-3) & (out.maps * 255 > err - 1)).all()
    assert out.latent is None and out.latent_error is None
    torch.testing.assert_close(out.pixel_error, out.maps.mean(dim=(1, 2, 3)))
    # PNG is lossless: what is written is what a classifier saw in memory
    save_dire(tmp_path / "m.png", out.maps[0])
    torch.testing.assert_close(load_dire(tmp_path / "m.png"), out.maps[0], atol=0, rtol=0)
    with pytest.raises(BadInputError, match="PNG"):
        save_dire(tmp_path / "m.jpg", out.maps[0])
    # batch-independent: an image's map does not depend on its batch mates (up to the float
    # rounding of a batch-size-dependent conv kernel, which can tip a floor by one level)
    alone = compute_dire(bb, x[1:], DireSettings(steps=2, resolution=16)).maps
    assert (alone - out.maps[1:]).abs().max() <= 1 / 255 + 1e-6 and (alone == out.maps[1:]).float().mean() > 0.99

    lat = compute_dire(tiny_sd, torch.rand(1, 3, 64, 64), DireSettings(steps=2, resolution=64))
    assert lat.maps.shape == (1, 3, 64, 64) and 0 <= lat.maps.min() and lat.maps.max() <= 1
    assert lat.latent is not None and lat.latent.shape == (1, 4, 8, 8) and float(lat.latent_error[0]) > 0
    with pytest.raises(BadInputError, match="multiple of 64"):
        compute_dire(tiny_sd, torch.rand(1, 3, 48, 48))


def test_resnet_falls_back_to_random_init_offline_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    from difffeat.heads.dire import DireClassifier, build_resnet

    create = timm.create_model

    def offline(name, pretrained=False, **kw):  # type: ignore[no-untyped-def]
        if pretrained:  # what timm does when the hub is unreachable and nothing is cached
            raise OSError("LocalEntryNotFoundError: offline")
        return create(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    lines: list[str] = []
    clf = DireClassifier(build_resnet("resnet18", echo=lines.append), crop=24).eval()
    assert len(lines) == 1 and "random init" in lines[0]
    with pytest.raises(BadInputError, match="not available"):
        build_resnet("resnet18", pretrained=True)
    assert clf(torch.rand(3, 3, 32, 32)).shape == (3,)  # centre crop 24, one logit per map
    with pytest.raises(BadInputError, match="unknown timm architecture"):
        build_resnet("resnet_nope")


def test_inputs_too_small_are_refused_and_crop_never_resamples() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 24, 3), dtype=np.uint8))  # 24 wide, 40 high
    with pytest.raises(BadInputError, match="smaller than the detector's 32px"):
        fit_square(img, 32, "resize")
    assert fit_square(img, 32).size == (32, 32)  # DIRE's center_crop_arr upsamples, as the reference
    assert fit_square(img, 16, "resize").size == (16, 16)
    crop = np.asarray(fit_square(img, 16, "crop"))
    np.testing.assert_array_equal(crop, np.asarray(img)[12:28, 4:20])


# --------------------------------------------------------------------------- training-free
def test_calibration_thresholds() -> None:
    rng = np.random.default_rng(0)
    real, fake = rng.normal(1.0, 0.1, 50), rng.normal(0.5, 0.1, 50)
    cal = calibrate(real, fake)
    assert 0.65 < cal.threshold < 0.85 and cal.n_real == 50 and cal.n_fake == 50
    p = cal.prob(torch.tensor([0.3, cal.threshold, 1.2]))
    assert p[0] > 0.95 and abs(float(p[1]) - 0.5) < 1e-6 and p[2] < 0.05
    only = calibrate(real, target_fpr=0.1)
    assert abs((real < only.threshold).mean() - 0.1) < 0.03
    with pytest.raises(BadInputError, match="cannot separate"):
        calibrate(fake, real)  # "fakes" scoring higher: wrong direction


class _Identity(nn.Module):
    """An 'autoencoder' that reconstructs perfectly."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def encode(self, x):  # type: ignore[no-untyped-def]
        return SimpleNamespace(latents=x)

    def decode(self, z):  # type: ignore[no-untyped-def]
        return SimpleNamespace(sample=z)


def _tiny_movq():  # type: ignore[no-untyped-def]
    from diffusers import VQModel

    torch.manual_seed(0)
    return VQModel(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   norm_num_groups=8, num_vq_embeddings=16, vq_embed_dim=4, sample_size=32)


def test_aeroblade_distance_is_lpips_layer2_golden() -> None:
    """The distance is LPIPS v0.1 VGG layer 2 with its learned lin weights: golden values from
    the reference's _PatchedLPIPS on the same trunk (benchmarks/fidelity/aeroblade.py). Uniform
    weights, L1, or no per-position unit normalisation all miss them by far."""
    g = _golden("aeroblade_golden.safetensors")
    dist = VGGLayer2Distance()
    a, b = g["a"].float() / 255, g["b"].float() / 255
    torch.testing.assert_close(dist(a, b), g["lpips_vgg_2"], rtol=1e-4, atol=1e-7)
    assert float(dist(a, a).abs().max()) == 0.0


def test_aeroblade_reconstructs_as_the_reference(tiny_sd_dir: Path) -> None:
    """SD VAE: a posterior sample with noise from a generator seeded 1 for each image; MoVQ:
    unquantised latents decoded with force_not_quantize; reconstructions floored to 8 bits."""
    x = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    vae = load_autoencoder(str(tiny_sd_dir), device="cpu", dtype="fp32")
    post = vae.module.encode(x * 2 - 1).latent_dist
    noise = torch.randn(post.mean.shape[1:], generator=torch.Generator().manual_seed(1))
    want = torch.floor(((vae.module.decode(post.mean + post.std * noise).sample + 1) / 2).clamp(0, 1) * 255) / 255
    torch.testing.assert_close(vae(x), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(vae(x[1:]), want[1:], atol=1e-6, rtol=0)  # independent of batch mates
    mean_rec = ((vae.module.decode(post.mean).sample + 1) / 2).clamp(0, 1)
    assert (vae(x) - mean_rec).abs().max() > 1e-3  # a sample, not the mean
    vq = Autoencoder(_tiny_movq(), "movq")
    h = vq.module.encode(x * 2 - 1).latents
    unq = ((vq.module.decode(h, force_not_quantize=True).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(vq(x), torch.floor(unq * 255) / 255, atol=1e-6, rtol=0)
    assert (unq - ((vq.module.decode(h).sample + 1) / 2).clamp(0, 1)).abs().max() > 1e-3  # quantising differs


def test_aeroblade_score_is_min_over_autoencoders_of_whole_images(tiny_sd_dir: Path) -> None:
    from difffeat.tasks.detect import Detector

    dist = VGGLayer2Distance()
    x = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    vae = load_autoencoder(str(tiny_sd_dir), device="cpu", dtype="fp32")
    aes = [vae, Autoencoder(_Identity(), "identity"), Autoencoder(_tiny_movq(), "movq")]
    d = aeroblade_distances(x, aes, dist)
    assert d.shape == (2, 3) and (d[:, 0] > 1e-3).all() and (d[:, 2] > 1e-3).all()
    assert float(d[:, 1].abs().max()) < 1e-5  # only the 8-bit floor of the reconstruction
    det = Detector({}, 0, "none", autoencoders=[aes[0], aes[2]], distance=dist, score="aeroblade")
    out = det(x)
    torch.testing.assert_close(out["score"], torch.minimum(d[:, 0], d[:, 2]))
    torch.testing.assert_close(out[f"dist:{vae.name}"], d[:, 0])
    torch.testing.assert_close(out["dist:movq"], d[:, 2])
    assert (d[:, 0] != d[:, 2]).all()
    # the whole image as it is: no crop, no resize (only sides beyond a multiple of 8 are dropped)
    rng = np.random.default_rng(0)
    assert det.prepare(Image.fromarray(rng.integers(0, 255, (56, 40, 3), dtype=np.uint8))).shape == (3, 56, 40)
    img = Image.fromarray(rng.integers(0, 255, (37, 45, 3), dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(whole_image(img)), np.asarray(img)[:32, :40])
    with pytest.raises(BadInputError, match="at least 8x8"):
        det.prepare(Image.new("RGB", (6, 20)))
    with pytest.raises(BadInputError, match="no component 'movq'"):
        load_autoencoder(str(tiny_sd_dir), "movq")


# --------------------------------------------------------------------------- honest evaluation
def _textures(rng: np.random.Generator, n: int, size: int = 72) -> list[Image.Image]:
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = 0.5 + 0.3 * np.sin(2 * np.pi * (3 * rng.random() * xx + 3 * rng.random() * yy))[..., None]
        img = img + 0.25 * rng.standard_normal((size, size, 3))
        out.append(Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2)))
    return out


class JpegGridDetector:
    """A 'detector' that only measures 8x8 JPEG block edges (high = a JPEG = 'real')."""

    size = 64

    def prepare(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32)[:64, :64].copy())

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        dx = (x[:, :, 1:] - x[:, :, :-1]).abs()
        on_grid = torch.arange(dx.shape[-1]) % 8 == 7
        return {"score": dx[:, :, on_grid].mean(dim=(1, 2)) / dx[:, :, ~on_grid].mean(dim=(1, 2))}


def test_format_normalisation_removes_the_jpeg_shortcut(tmp_path: Path) -> None:
    """Reals as JPEG and fakes as PNG (same content distribution): a JPEG detector looks perfect
    as-is and drops to chance once both classes are resized and JPEG-encoded alike."""
    from difffeat.tasks.detect import evaluate, normalize_format

    rng = np.random.default_rng(0)
    (tmp_path / "real").mkdir()
    (tmp_path / "fake").mkdir()
    for i, im in enumerate(_textures(rng, 12)):
        im.save(tmp_path / "real" / f"{i}.jpg", quality=50)
    for i, im in enumerate(_textures(rng, 12)):
        im.save(tmp_path / "fake" / f"{i}.png")
    real, fake = sorted((tmp_path / "real").iterdir()), sorted((tmp_path / "fake").iterdir())
    norm = normalize_format(Image.open(real[0]), 64, 96)
    assert norm.size == (64, 64) and norm.mode == "RGB"
    det = JpegGridDetector()
    as_is = evaluate(det, real, fake, batch_size=8)  # type: ignore[arg-type]
    normalised = evaluate(det, real, fake, batch_size=8, normalize=(64, 96))  # type: ignore[arg-type]
    assert as_is["ap"] > 0.99 and as_is["n_real"] == 12 and "acc" not in as_is  # uncalibrated: AP only
    assert normalised["ap"] < 0.75, normalised


# --------------------------------------------------------------------------- CLI end to end
def _folders(root: Path) -> tuple[Path, Path]:
    """Reals: noisy JPEG photos; fakes: smooth PNGs (24 px, larger than the 16 px input)."""
    rng = np.random.default_rng(0)
    real, fake = root / "real", root / "fake"
    real.mkdir(parents=True)
    fake.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(real / f"r{i}.jpg", quality=90)
        smooth = np.kron(rng.integers(0, 255, (3, 3, 3)), np.ones((8, 8, 1))).astype(np.uint8)
        Image.fromarray(smooth).filter(ImageFilter.GaussianBlur(3)).save(fake / f"f{i}.png")
    return real, fake


def _run(args: list[str]):  # type: ignore[no-untyped-def]
    from difffeat.cli import register_commands

    return CliRunner().invoke(register_commands(), args, catch_exceptions=False)


def test_train_detect_eval_cli(tiny_pixel_dir: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    real, fake = _folders(tmp_path)
    ckpt = tmp_path / "ckpt"
    common = ["-m", str(tiny_pixel_dir), "--steps", "3", "--resolution", "16", "--device", "cpu", "--dtype", "fp32", "-b", "4"]
    r = _run(["train", "dire", str(real), str(fake), "--preset", "dire-adm256", *common, "--arch", "resnet18",
              "--no-pretrained", "--epochs", "6", "--lr", "1e-3", "--crop", "16", "-o", str(ckpt)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((ckpt / "detector.json").read_text())
    assert cfg["kind"] == "dire-classifier" and cfg["dire"]["steps"] == 3 and cfg["dire"]["clip_x0"] is True
    hist = cfg["history"]
    assert len(hist) == 6 and hist[-1] < hist[0], hist  # training reduces the loss
    assert len(list((ckpt / "maps" / "real").glob("*.png"))) == 6

    scores, maps = tmp_path / "scores.csv", tmp_path / "dire"
    r = _run(["detect", str(real), "--head", str(ckpt), "-o", str(scores), "--save-dire", str(maps), "-b", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(scores.open()))
    assert len(rows) == 6 and all(0 <= float(x["prob"]) <= 1 and x["pred"] in ("real", "fake") for x in rows)
    # DIRE is deterministic: detect's maps equal the ones the classifier was trained on
    torch.testing.assert_close(load_dire(maps / "r0.png"), load_dire(ckpt / "maps" / "real" / "r0.png"), atol=0, rtol=0)

    # resumable: a rerun skips finished images; an unreadable image fails alone with one line
    # (DIRE's center_crop_arr upsamples small images, as the reference, so size is no longer an error)
    (real / "tiny.png").write_bytes(b"not a png")
    r = _run(["detect", str(real), "--head", str(ckpt), "-o", str(scores), "-b", "4", "--device", "cpu"])
    assert r.exit_code != 0 and "resuming: 6 of 7" in r.output and "cannot read image" in r.output
    assert len(list(csv.DictReader(scores.open()))) == 6  # finished rows are kept

    # a checkpoint for another backbone is refused before anything is computed
    r = _run(["detect", str(fake), "--head", str(ckpt), "-m", str(tiny_sd_dir), "-o", str(tmp_path / "x.csv")])
    assert r.exit_code == 2 and "trained with preset" in r.output

    (real / "tiny.png").unlink()
    r = _run(["eval", "detect", str(real), str(fake), "--head", str(ckpt), "--normalize-format", "--size", "16",
              "-b", "4", "--device", "cpu", "-o", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(m) == {"as-is", "normalized"} and m["normalized"]["jpeg_quality"] == 96
    for v in m.values():
        assert 0 <= v["acc"] <= 1 and 0 <= v["ap"] <= 1 and v["n_real"] == 6 and v["n_fake"] == 6


def test_pooled_head_and_training_free_calibration_cli(tiny_pixel_dir: Path, tmp_path: Path) -> None:
    real, fake = _folders(tmp_path)
    common = ["-m", str(tiny_pixel_dir), "--resolution", "16", "--device", "cpu", "--dtype", "fp32", "-b", "6"]
    r = _run(["train", "dire", str(real), str(fake), "--head", "pooled", *common, "--epochs", "60", "--lr", "5e-2",
              "-o", str(tmp_path / "pooled")])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "pooled" / "detector.json").read_text())
    assert cfg["kind"] == "pooled-features" and cfg["backbone"]["layers"] == ["mid"]
    assert cfg["history"][-1] < 0.5 * cfg["history"][0]
    r = _run(["detect", str(fake), "--head", str(tmp_path / "pooled"), "-o", str(tmp_path / "p.csv"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    probs = [float(x["prob"]) for x in csv.DictReader((tmp_path / "p.csv").open())]
    assert len(probs) == 6 and np.mean(probs) > 0.5  # it learnt its training fakes
    r = _run(["detect", str(fake), "--training-free", "--preset", "dire-adm256", *common, "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and "another detector" in r.output  # no silent mixing of two detectors' rows

    # (a random UNet: at 5 steps its mean DIRE is lower for these smooth fakes, so Platt has a direction)
    r = _run(["train", "dire", str(real), str(fake), "--head", "training-free", "--steps", "5", *common,
              "-o", str(tmp_path / "tf")])
    assert r.exit_code == 0, r.output
    cal = json.loads((tmp_path / "tf" / "detector.json").read_text())["calibration"]
    assert cal["n_real"] == 6 and cal["n_fake"] == 6 and cal["method"] == "platt"
    r = _run(["detect", str(real), "--head", str(tmp_path / "tf"), "-o", str(tmp_path / "t.csv"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert len(rows) == 6 and all(r["prob"] != "" and float(r["dire"]) == pytest.approx(float(r["score"])) for r in rows)


def test_aeroblade_calibration_cli(tiny_sd_dir: Path, tmp_path: Path) -> None:
    """Images that went through the autoencoder (the 'fakes') are closer to their own AE
    reconstruction than other images: calibrate on them, then evaluate."""
    rng = np.random.default_rng(0)
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir()
    fake.mkdir()
    ae = load_autoencoder(str(tiny_sd_dir), device="cpu", dtype="fp32")
    for i in range(6):  # whole images of two sizes, scored as they are
        w, h = (64, 64) if i % 2 else (48, 40)
        smooth = lambda: Image.fromarray(rng.integers(0, 255, (2 * h, 2 * w, 3), dtype=np.uint8)).resize((w, h), Image.BOX)  # noqa: E731
        smooth().save(real / f"r{i}.png")
        rec = ae(torch.from_numpy(np.asarray(smooth(), np.float32) / 255).permute(2, 0, 1)[None])[0]
        Image.fromarray((rec.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(fake / f"f{i}.png")
    common = ["--device", "cpu", "--dtype", "fp32", "-b", "6"]
    r = _run(["train", "dire", str(real), str(fake), "--head", "training-free", "--preset", "aeroblade",
              "--autoencoder", str(tiny_sd_dir), *common, "-o", str(tmp_path / "ck")])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "ck" / "detector.json").read_text())
    assert cfg["backbone"]["autoencoders"] == [f"{tiny_sd_dir}:vae"] and cfg["calibration"]["method"] == "platt"
    r = _run(["eval", "detect", str(real), str(fake), "--head", str(tmp_path / "ck"), "--device", "cpu",
              "-o", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())["as-is"]
    assert m["ap"] == 1.0 and m["acc"] >= 0.9, m


def test_detect_compile_flag_compiles_the_denoiser(tiny_pixel_dir: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """--compile reaches compile_denoiser (whole denoiser for DIRE). That compiled scores equal
    eager ones is checked on the GPU (benchmarks/gpu_cli_smoke.sh: 'detect: max |d dire|'):
    compiling on 2 CPU cores took ~9 minutes here."""
    import difffeat.tasks.detect as det

    calls = []
    monkeypatch.setattr(det, "compile_denoiser", lambda bb: calls.append(bb))
    real, _ = _folders(tmp_path)
    common = ["--training-free", "--preset", "dire-adm256", "-m", str(tiny_pixel_dir), "--resolution", "16",
              "--steps", "2", "--device", "cpu", "--dtype", "fp32", "-b", "6"]
    r = _run(["detect", str(real), *common, "--compile", "-o", str(tmp_path / "compiled.csv")])
    assert r.exit_code == 0, r.output
    assert len(calls) == 1 and hasattr(calls[0], "denoiser")
    assert len(list(csv.DictReader((tmp_path / "compiled.csv").open()))) == 6
