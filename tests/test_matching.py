"""Matching on synthetic features: exact recovery, DIFT equivalence, sub-pixel soft-argmax, backends."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difffeat.errors import BadInputError, UnknownNameError
from difffeat.heads import matching as M


def cell_centres(h: int, w: int, image_size: tuple[int, int]) -> torch.Tensor:
    """``[h*w, 2]`` image coordinates of the centres of an ``(h, w)`` grid, row-major."""
    return M.rescale_points(M.pixel_grid((h, w)).reshape(-1, 2), (h, w), image_size)


def test_rescale_points_is_the_align_corners_false_mapping():
    # 8x8-pixel cells: cell (0, 0) is centred at pixel 3.5, cell (1, 2) at (19.5, 11.5).
    pts = torch.tensor([[3.5, 3.5], [19.5, 11.5], [-0.5, -0.5]])
    grid = M.rescale_points(pts, (32, 48), (4, 6))
    assert torch.allclose(grid, torch.tensor([[0.0, 0.0], [2.0, 1.0], [-0.5, -0.5]]))
    assert torch.allclose(M.rescale_points(grid, (4, 6), (32, 48)), pts)
    # Anisotropic: x scales with W, y with H.
    assert torch.allclose(M.rescale_points(torch.tensor([[0.0, 0.0]]), (10, 20), (20, 10)), torch.tensor([[-0.25, 0.5]]))


def dift_reference(sf, tf, pts, size, metric="cosine"):
    """DIFT literally: upsample both maps to the image, index the source, score every target pixel."""
    su = F.interpolate(sf[None], size=size, mode="bilinear", align_corners=False)[0]
    tu = F.interpolate(tf[None], size=size, mode="bilinear", align_corners=False)[0]
    q = su[:, pts[:, 1].long(), pts[:, 0].long()].T
    t = tu.reshape(tu.shape[0], -1).T
    if metric == "cosine":
        s = F.normalize(q, dim=-1) @ F.normalize(t, dim=-1).T
    else:
        s = -torch.cdist(q, t).pow(2)
    best, idx = s.max(1)
    return torch.stack([idx % size[1], idx // size[1]], -1).float(), best, q


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_match_points_equals_dift_upsample_then_argmax(metric):
    g = torch.Generator().manual_seed(0)
    sf, tf = torch.randn(16, 5, 7, generator=g), torch.randn(16, 5, 7, generator=g)
    size = (23, 31)  # not a multiple of the grid
    pts = torch.tensor([[0.0, 0.0], [30.0, 22.0], [10.0, 5.0], [17.0, 11.0]])
    ref_pts, ref_best, ref_q = dift_reference(sf, tf, pts, size, metric)
    assert torch.allclose(M.sample_descriptors(sf[None], pts[None], size)[0], ref_q, atol=1e-5)
    m = M.match_points(sf, tf, pts, src_size=size, tgt_size=size, metric=metric, query_chunk=3)
    assert torch.equal(m.points, ref_pts)
    assert torch.allclose(m.scores, ref_best, atol=1e-4, rtol=1e-5)


def permuted_pair(c=32, h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(c, h, w, generator=g)
    perm = torch.randperm(h * w, generator=g)  # target cell k holds source cell perm[k]
    tgt = src.flatten(1)[:, perm].reshape(c, h, w)
    where = torch.empty_like(perm)
    where[perm] = torch.arange(h * w)  # source cell i sits at target cell where[i]
    return src, tgt, where


@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("mode", ["argmax", "mutual", "soft"])
def test_permutation_recovered_exactly(mode, upsample):
    h, w, stride = 4, 6, 5  # odd stride: cell centres fall on pixel centres
    size = (h * stride, w * stride)
    src, tgt, where = permuted_pair(h=h, w=w)
    centres = cell_centres(h, w, size)
    m = M.match_points(src, tgt, centres, src_size=size, tgt_size=size, mode=mode, upsample=upsample)
    expect = centres[where]
    if upsample:
        # Bilinear upsampling clamps at the border, so border cells score 1 on a plateau
        # that reaches the image edge and the first pixel of it wins (as in DIFT):
        # every match still lies in the right cell, interior ones on its centre.
        in_cell = (M.rescale_points(m.points, size, (h, w)) - M.rescale_points(expect, size, (h, w))).abs()
        assert in_cell.max() <= 0.5
        interior = ((expect > stride) & (expect < torch.tensor([size[1], size[0]]) - stride)).all(-1)
        # The soft-argmax window then spans pixels of neighbouring cells (radius counts
        # pixels here), which pulls its estimate by a fraction of a pixel.
        tol = 0.5 if mode == "soft" else 1e-4
        assert (m.points[interior] - expect[interior]).abs().max() <= tol
    else:
        assert torch.allclose(m.points, expect, atol=1e-4)
    assert torch.allclose(m.scores, torch.ones(h * w), atol=1e-5)
    if mode == "mutual":
        assert m.mutual is not None and bool(m.mutual.all())


def test_mutual_nearest_neighbors_recovers_permutation_and_flags_one_sided_matches():
    src, tgt, where = permuted_pair()
    a, b = src.flatten(1).T, tgt.flatten(1).T
    idx, mutual = M.mutual_nearest_neighbors(a, b)
    assert torch.equal(idx, where) and bool(mutual.all())
    # a1 is a near-copy of a0: both pick b0, but b0 picks a0 only.
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    idx, mutual = M.mutual_nearest_neighbors(a, b, metric="l2")
    assert idx.tolist() == [0, 0, 1] and mutual.tolist() == [True, False, True]


def test_mutual_flag_false_when_the_target_prefers_another_source_point():
    # Source cells 0 and 1 carry nearly the same descriptor; the target has it once.
    c = 8
    src = torch.zeros(c, 1, 3)
    src[0, 0, 0], src[0, 0, 1], src[1, 0, 1], src[2, 0, 2] = 1.0, 1.0, 0.2, 1.0
    tgt = torch.zeros(c, 1, 3)
    tgt[0, 0, 2], tgt[2, 0, 0], tgt[3, 0, 1] = 1.0, 1.0, 1.0
    size = (1, 3)
    pts = cell_centres(1, 3, size)[:2]
    m = M.match_points(src, tgt, pts, src_size=size, tgt_size=size, mode="mutual", upsample=False,
                       mutual_radius=0.0)
    assert m.points[:, 0].tolist() == [2.0, 2.0]
    assert m.mutual.tolist() == [True, False]


def shifted_pair(shift: int, c=24, h=5, w=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(c, h, w + shift, generator=g)
    return big[:, :, :w].contiguous(), big[:, :, shift:shift + w].contiguous()


def test_batched_pairs_recover_their_own_shifts():
    h, w, stride = 5, 8, 3
    size = (h * stride, w * stride)
    pairs = [shifted_pair(2), shifted_pair(3, seed=2)]
    sf = torch.stack([p[0] for p in pairs])
    tf = torch.stack([p[1] for p in pairs])
    # Source cells with x >= shift exist in the target, shifted left by `shift` cells.
    centres = cell_centres(h, w, size).reshape(h, w, 2)
    pts = torch.stack([centres[:, 3:].reshape(-1, 2)] * 2)
    m = M.match_points(sf, tf, pts, src_size=size, tgt_size=size, upsample=False)
    assert m.points.shape == (2, h * (w - 3), 2)
    for b, shift in enumerate([2, 3]):
        expect = pts[b] - torch.tensor([shift * stride, 0.0])
        assert torch.allclose(m.points[b], expect)


def test_window_soft_argmax_is_subpixel_accurate_on_a_smooth_peak():
    h, w = 20, 24
    grid = M.pixel_grid((h, w))
    peaks = torch.tensor([[7.3, 11.6], [12.85, 4.2], [3.5, 15.05]])
    # Quadratic peak in the score: softmax(s / 0.02) is a Gaussian with sigma = 1 cell.
    d2 = ((grid[None] - peaks[:, None, None]) ** 2).sum(-1)
    scores = 1.0 - 0.01 * d2
    xy, best = M.window_soft_argmax(scores, radius=5, temperature=0.02)
    assert (xy - peaks).abs().max() < 1e-3
    hard, _ = M.argmax_2d(scores)
    assert (hard - peaks).abs().max() > 0.3  # the hard argmax cannot do this
    assert torch.equal(M.window_soft_argmax(scores, radius=0)[0], hard)
    assert torch.allclose(best, scores.flatten(1).max(1).values)


def test_window_soft_argmax_ignores_scores_outside_the_window():
    s = torch.zeros(1, 15, 15)
    s[0, 7, 7] = 1.0
    s[0, 7, 14] = 0.999  # a strong distant peak must not pull the estimate
    xy, _ = M.window_soft_argmax(s, radius=2, temperature=0.5)
    assert torch.allclose(xy, torch.tensor([[7.0, 7.0]]))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_dense_flow_recovers_a_known_shift(backend):
    h, w, stride, shift = 5, 8, 4, 3
    size = (h * stride, w * stride)
    src, tgt = shifted_pair(shift, h=h, w=w)
    d = M.dense_flow(src, tgt, src_size=size, tgt_size=size, backend=backend)
    assert d.mapping.shape == (h, w, 2) and d.size == (h, w)
    centres = cell_centres(h, w, size).reshape(h, w, 2)
    valid = slice(0, w - shift)  # target cells whose content exists in the source
    expect = centres[:, valid] + torch.tensor([shift * stride, 0.0])
    assert torch.equal(d.mapping[:, valid], expect)
    assert torch.allclose(d.scores[:, valid], torch.ones(h, w - shift), atol=1e-5)
    soft = M.dense_flow(src, tgt, src_size=size, tgt_size=size, mode="soft")
    assert torch.allclose(soft.mapping[:, valid], expect, atol=1e-3)


def test_dense_flow_per_pixel_matches_point_matching():
    g = torch.Generator().manual_seed(3)
    sf, tf = torch.randn(8, 3, 4, generator=g), torch.randn(8, 3, 4, generator=g)
    size = (9, 12)
    d = M.dense_flow(tf, sf, src_size=size, tgt_size=size, out_size=size, query_chunk=20)
    # Matching every target pixel into the source grid == point matching without upsampling.
    pts = M.pixel_grid(size).reshape(-1, 2)
    m = M.match_points(sf, tf, pts, src_size=size, tgt_size=size, upsample=False)
    assert d.mapping.shape == (9, 12, 2)
    assert torch.equal(d.mapping.reshape(-1, 2), m.points)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_faiss_and_torch_backends_agree(metric):
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 50, 16, generator=g), torch.randn(2, 70, 16, generator=g)
    st, it = M.nearest_neighbors(q, k, metric=metric, k=3, backend="torch", chunk_elems=200)
    sf, i_f = M.nearest_neighbors(q, k, metric=metric, k=3, backend="faiss")
    assert torch.equal(it, i_f)
    assert torch.allclose(st, sf, atol=1e-4)
    ref = M.pairwise_scores(q, k, metric).topk(3, dim=-1)
    assert torch.equal(it, ref.indices)
    # Unbatched inputs give unbatched outputs.
    s1, i1 = M.nearest_neighbors(q[0], k[0], metric=metric, backend="faiss")
    assert i1.shape == (50, 1) and torch.equal(i1[:, 0], it[0, :, 0])


def test_warp_image_follows_the_mapping():
    g = torch.Generator().manual_seed(5)
    img = torch.rand(3, 6, 10, generator=g)
    ident = M.pixel_grid((6, 10))
    assert torch.allclose(M.warp_image(img, ident), img, atol=1e-6)
    shifted = ident + torch.tensor([2.0, 1.0])
    out = M.warp_image(img, shifted)
    assert torch.allclose(out[:, :5, :8], img[:, 1:, 2:], atol=1e-6)


def test_mutual_nn_distance_prefers_the_aligned_orientation():
    g = torch.Generator().manual_seed(6)
    a = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    assert float(M.mutual_nn_distance(a, a)) < 1e-6
    near = F.normalize(a + 0.05 * torch.randn(40, 16, generator=g), dim=-1)
    far = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    assert float(M.mutual_nn_distance(a, near)) < float(M.mutual_nn_distance(a, far))
    batched = M.mutual_nn_distance(torch.stack([a, a]), torch.stack([near, far]))
    assert batched.shape == (2,) and batched[0] < batched[1]


def test_bad_arguments_give_one_line_errors():
    f = torch.randn(4, 3, 3)
    with pytest.raises(UnknownNameError, match="unknown metric 'dot'"):
        M.match_points(f, f, torch.zeros(1, 2), src_size=(6, 6), tgt_size=(6, 6), metric="dot")
    with pytest.raises(UnknownNameError, match="matching mode"):
        M.match_points(f, f, torch.zeros(1, 2), src_size=(6, 6), tgt_size=(6, 6), mode="best")
    with pytest.raises(BadInputError, match="channels"):
        M.match_points(f, torch.randn(5, 3, 3), torch.zeros(1, 2), src_size=(6, 6), tgt_size=(6, 6))
    with pytest.raises(BadInputError, match=r"\(x, y\)"):
        M.match_points(f, f, torch.zeros(1, 3), src_size=(6, 6), tgt_size=(6, 6))
    with pytest.raises(UnknownNameError, match="backend"):
        M.nearest_neighbors(torch.zeros(2, 4), torch.zeros(3, 4), backend="annoy")
