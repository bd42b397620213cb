"""Protocol details of the correspondence/fusion presets, pinned without the reference code.

FreeU and the sliding window (GeoAware-SC / SD-DINO via ODISE), the extractor's row ->
timestep mapping, and SD-DINO's fusion (joint co-PCA, centring, per-source weights).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import difffeat
from difffeat.fusion import fuse, pyramid_resample, resample
from difffeat.sliding import SlidingWindow, window_origins


def _fourier(x: torch.Tensor, scale: float) -> torch.Tensor:
    """ODISE's Fourier_filter(threshold=1): the centred 2x2 square of the shifted spectrum times scale."""
    f = torch.fft.fftshift(torch.fft.fftn(x.double(), dim=(-2, -1)), dim=(-2, -1))
    h, w = f.shape[-2:]
    f[..., h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1] *= scale
    return torch.fft.ifftn(torch.fft.ifftshift(f, dim=(-2, -1)), dim=(-2, -1)).real.to(x.dtype)


def _odise_freeu_decoder(unet, x, t, ehs, b=(1.2, 1.4), s=(0.9, 0.2)) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The ODISE fork's unet_forward (decoder_only) by hand: FreeU by channel count, and the
    stored h scaled in place afterwards because it is the same tensor."""
    top = max(unet.config.block_out_channels)
    factors = {top: (b[0], s[0]), top // 2: (b[1], s[1])}
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    h = unet.conv_in(x)
    res: tuple = (h,)
    for blk in unet.down_blocks:
        h, r = blk(h, emb, encoder_hidden_states=ehs) if getattr(blk, "has_cross_attention", False) else blk(h, emb)
        res += r
    h = unet.mid_block(h, emb, encoder_hidden_states=ehs)
    stored: dict[str, torch.Tensor] = {}
    for i, blk in enumerate(unet.up_blocks):
        for j, resnet in enumerate(blk.resnets):
            skip, res = res[-1], res[:-1]
            if h.shape[1] in factors:
                bf, sf = factors[h.shape[1]]
                c = h.shape[1] // 2
                h[:, :c] = h[:, :c] * bf  # in place, as ldm.py: also changes a stored h
                skip = _fourier(skip, sf)
            h = resnet(torch.cat([h, skip], 1), emb)
            stored[f"up.{i}.res.{j}"] = h
            if getattr(blk, "attentions", None):
                h = blk.attentions[j](h, encoder_hidden_states=ehs).sample
                stored[f"up.{i}.attn.{j}"] = h
        if blk.upsamplers:
            h = blk.upsamplers[0](h)
        stored[f"up.{i}"] = h
    return stored


def test_freeu_matches_the_odise_fork_including_the_in_place_scaling(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    layers = ["up.0.res.0", "up.1", "up.1.attn.0", "up.1.attn.1", "up.2.attn.0"]
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ex = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=layers, timesteps=[50], noise="clean", freeu="geoaware")
    got = ex(x)
    plain = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=layers, timesteps=[50], noise="clean")(x)
    bb = tiny_sd
    z = bb.vae.encode(x * 2 - 1).latent_dist.mean * bb.vae.config.scaling_factor
    ehs = bb.conditioning(prompts="", batch=1).kwargs["encoder_hidden_states"]
    with torch.no_grad():
        ref = _odise_freeu_decoder(bb.denoiser, z, torch.tensor([50]), ehs)
    for name in layers:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got[name], plain[name], rtol=1e-3, atol=1e-4)
    assert ex.metadata()["freeu"] == "geoaware"


class _Echo(torch.nn.Module):
    """A fake extractor whose 'feature' is the input itself average-pooled by 8, plus a count map."""

    keys = ["f"]
    resolution, resize = None, "resize"

    def _as_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, **_: object) -> dict[str, torch.Tensor]:
        self.calls = getattr(self, "calls", []) + [tuple(x.shape[-2:])]
        return {"f": F.avg_pool2d(x, 8)}


def test_sliding_window_is_odises_two_by_two_overlap_average() -> None:
    assert window_origins(960, 512) == [0, 448]  # 2x2 crops of 512 overlapping by 64 px at 960
    assert window_origins(512, 512) == [0] and window_origins(1100, 512) == [0, 512, 588]
    x = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    echo = _Echo()
    out = SlidingWindow(echo, 64)(x)["f"]
    assert echo.calls == [(64, 64)] * 4  # origins (0, 32) x (0, 16)
    torch.testing.assert_close(out, F.avg_pool2d(x, 8))  # overlaps agree, so the average is exact
    # overlapping cells average the crops: a fake whose feature is the crop's origin
    class Origin(_Echo):
        def forward(self, x: torch.Tensor, **_: object) -> dict[str, torch.Tensor]:
            return {"f": torch.full((1, 1, 8, 8), float(x[0, 0, 0, 0]))}

    marks = torch.zeros(1, 3, 96, 96)
    marks[..., 0, 0], marks[..., 32, 0], marks[..., 0, 32], marks[..., 32, 32] = 1.0, 2.0, 3.0, 4.0
    o = SlidingWindow(Origin(), 64)(marks)["f"][0, 0]
    assert o[0, 0] == 1.0 and o[-1, -1] == 4.0 and o[5, 5] == pytest.approx(2.5)  # centre: all four crops


def test_sd_dino_preset_sources_use_window_and_pyramid() -> None:
    from difffeat.registry import get_preset

    sd = get_preset("sd-dino").raw["fusion"]
    geo = get_preset("geoaware-zs").raw["fusion"]
    assert sd["resample"] == "pyramid" and geo["resample"] == "direct"
    assert sd["sources"][0]["window"] == 512 and geo["sources"][0]["window"] == 512
    assert geo["sources"][0]["freeu"] == "geoaware" and "freeu" not in sd["sources"][0]
    assert get_preset("dift").extract["latent"] == "sample"  # DIFT samples the posterior per member


def test_pyramid_resample_is_sd_dinos_two_step_path() -> None:
    g = torch.Generator().manual_seed(0)
    s5, s4, s3 = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 16, 16, generator=g)
    up = lambda m, n: F.interpolate(m, size=(n, n), mode="bilinear", align_corners=False)  # noqa: E731
    want = torch.cat([s3, up(torch.cat([s4, up(s5, 8)], 1), 16)], 1)  # co_pca: 15->30, cat, 30->60
    torch.testing.assert_close(pyramid_resample([s5, s4, s3], 16), want)
    direct = torch.cat([resample(m, 16) for m in (s5, s4, s3)], 1)
    assert not torch.allclose(want[:, 4:], direct[:, :3])  # one-step 15->60 is a different map


def test_several_timesteps_with_an_ensemble_equal_single_timestep_runs(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    kw = dict(backbone=tiny_sd, layers=["up.1"], ensemble=3, noise="fixed", max_batch=4)
    both = difffeat.create(tiny_sd.source, timesteps=[100, 800], **kw)(x)
    # with fixed noise, draw() gives timestep ti the slice noise[ti]; a one-timestep run at T
    # draws noise[0]; so compare T=100 (first) directly and T=800 via a run whose only row is it
    one_100 = difffeat.create(tiny_sd.source, timesteps=[100], **kw)(x)["up.1"]
    torch.testing.assert_close(both["up.1@t100"], one_100, rtol=1e-4, atol=1e-5)
    from difffeat.noise import draw

    ex = difffeat.create(tiny_sd.source, timesteps=[800], **kw)
    _, nz = draw("fixed", ["-"] * 2, 0, (4, 8, 8), 3, 2, False)
    mean, _ = tiny_sd.encode(x)
    rows = tiny_sd.add_noise(mean.unsqueeze(1).expand(2, 3, 4, 8, 8).reshape(6, 4, 8, 8), nz[:, 1].reshape(6, 4, 8, 8),
                             torch.full((6,), 800))
    cond = tiny_sd.conditioning(prompts="", batch=2).repeat_interleave(3)
    f = ex.run_denoiser(rows, torch.full((6,), 800), cond)["up.1"].float().reshape(2, 3, -1, 4, 4).mean(1)
    torch.testing.assert_close(both["up.1@t800"], f, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both["up.1@t800"], both["up.1@t100"], rtol=1e-3, atol=1e-4)


def _pair_maps(g: torch.Generator, shape=(5, 5)) -> torch.Tensor:
    """Two images' [2, 12, h, w] maps with a clear spectrum: directions 0, 1 shared (var 100, 50),
    direction 2 only in image B (var 20), direction 3 only in image A (var 5), an offset, noise."""
    n = shape[0] * shape[1]
    basis = torch.linalg.qr(torch.randn(12, 12, generator=g))[0]
    coef = torch.zeros(2, n, 12)
    coef[:, :, 0] = 10 * torch.randn(2, n, generator=g)
    coef[:, :, 1] = 7 * torch.randn(2, n, generator=g)
    coef[1, :, 2] = 4.5 * torch.randn(n, generator=g)
    coef[0, :, 3] = 2.2 * torch.randn(n, generator=g)
    x = coef @ basis.T + 6.0 * basis[:, 5] + 0.01 * torch.randn(2, n, 12, generator=g)
    return x.permute(0, 2, 1).reshape(2, 12, *shape)


def _sd_dino_reference(sd_layers: list[torch.Tensor], dino: torch.Tensor, k: int, w_sd: float, w_dino: float) -> torch.Tensor:
    """SD-DINO by its code: co_pca (utils/utils_correspondence.py L358-433: concatenate the pair
    along space, centre, torch.pca_lowrank(q=k), split), L2-normalise SD and DINO descriptors and
    weight them (pck_spair_pascal.py L283-299). Returns [2, D, h*w]."""
    reduced = []
    for f in sd_layers:
        feats = torch.cat([f[0].flatten(1), f[1].flatten(1)], 1).T  # (t_x + t_y) x d
        centred = feats - feats.mean(0, keepdim=True)
        torch.manual_seed(0)  # difffeat seeds its randomised PCA with 0
        _, _, v = torch.pca_lowrank(centred, q=k)
        reduced.append((centred @ v[:, :k]).T.reshape(k, 2, -1).permute(1, 0, 2))  # [2, k, h*w]
    sd = torch.cat(reduced, 1)
    sd = sd / sd.norm(dim=1, keepdim=True)
    dn = dino.flatten(2) / dino.flatten(2).norm(dim=1, keepdim=True)
    return torch.cat([w_sd * sd, w_dino * dn], 1)


def _cross_distances(desc: torch.Tensor) -> torch.Tensor:
    """[2, D, N] -> the N x N L2 distances from image A's cells to image B's (basis-invariant)."""
    return torch.cdist(desc[0].T, desc[1].T)


def test_fusion_equals_sd_dinos_joint_centred_co_pca_and_source_weights() -> None:
    g = torch.Generator().manual_seed(3)
    sd = [_pair_maps(g), _pair_maps(g)]
    dino = torch.randn(2, 7, 5, 5, generator=g)
    want = _cross_distances(_sd_dino_reference(sd, dino, 3, 0.3, 0.7))
    got = fuse([sd, [dino]], [0.3, 0.7], grid=5, pca_dims=[3, None])
    torch.testing.assert_close(_cross_distances(got.flatten(2)), want, rtol=1e-3, atol=1e-3)
    swapped = fuse([sd, [dino]], [0.7, 0.3], grid=5, pca_dims=[3, None])
    assert (_cross_distances(swapped.flatten(2)) - want).abs().max() > 0.05  # unequal weights matter


def _geoaware_get_flow(scores: torch.Tensor, window: int, beta: float = 0.02) -> torch.Tensor:
    """GeoAware-SC's window soft-argmax by its code (utils/utils_correspondence.py get_flow
    L297-336 + soft_argmax L234-256): zero the map outside the clamped window around the argmax,
    softmax(x / beta) over the WHOLE map, expected (x, y) in cell units. scores [N, h, w]."""
    n, h, w = scores.shape
    idx = scores.flatten(1).argmax(1)
    mask = torch.zeros_like(scores)
    offs = torch.arange(-window, window + 1)
    for i in range(n):
        ys = (idx[i] // w + offs).clamp(0, h - 1)
        xs = (idx[i] % w + offs).clamp(0, w - 1)
        mask[i][ys[:, None], xs[None, :]] = 1
    p = torch.softmax((scores * mask).flatten(1).double() / beta, 1).reshape(n, h, w)
    xs, ys = torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64)
    return torch.stack([(p.sum(1) * xs).sum(1), (p.sum(2) * ys).sum(1)], 1).float()


def test_window_soft_argmax_zero_fills_outside_the_window_as_geoaware() -> None:
    from difffeat.heads.matching import window_soft_argmax

    g = torch.Generator().manual_seed(0)
    low = 0.05 * torch.rand(6, 20, 20, generator=g)  # low similarities: the zeros outside count
    low[:, 3, 17] += 0.02  # peak near a corner: the clamped window
    high = 0.6 + 0.3 * torch.rand(6, 20, 20, generator=g)
    for scores in (low, high):
        xy, best = window_soft_argmax(scores, radius=5, temperature=0.02)
        torch.testing.assert_close(xy, _geoaware_get_flow(scores, 5), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(best, scores.flatten(1).max(1).values)
    xy_low, _ = window_soft_argmax(low, radius=5, temperature=0.02)
    assert (xy_low - torch.tensor([17.0, 3.0])).abs().max() > 1.0  # pulled towards the map centre


def test_source_descriptor_read_at_the_containing_cell() -> None:
    from difffeat.heads.matching import match_points, read_source

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 8, 4, 4, generator=g)
    pts = torch.tensor([[[7.9, 3.2], [0.0, 15.99], [15.9, 8.0]]])  # 16x16 image, 4 px cells
    cells = read_source(feats, pts, (16, 16), "cell")
    want = torch.stack([feats[0, :, 0, 1], feats[0, :, 3, 0], feats[0, :, 2, 3]])  # floor(x * w / W)
    torch.testing.assert_close(cells[0], want)
    # matching the source map into itself from the cell read lands on that cell's centre
    m = match_points(feats[0], feats[0], pts[0], src_size=(16, 16), tgt_size=(16, 16), upsample=False, src_read="cell")
    torch.testing.assert_close(m.points, torch.tensor([[5.5, 1.5], [1.5, 13.5], [13.5, 9.5]]))


def test_pad_policy_resizes_with_lanczos_as_sd_dino() -> None:
    """utils_correspondence.resize: LANCZOS to the target's longer side, centred on a black square."""
    import numpy as np
    from PIL import Image

    from difffeat.io import pil_to_tensor, prepare_image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    p = prepare_image(img, 40, "pad")
    canvas = np.zeros((40, 40, 3), np.uint8)
    canvas[(40 - 24) // 2:(40 + 24) // 2] = np.asarray(img.resize((40, 24), Image.LANCZOS))
    torch.testing.assert_close(p.image, pil_to_tensor(Image.fromarray(canvas)))
