"""DiffSeg (Tian et al., CVPR 2024) against google/diffseg, on the tiny SD.

The release is TensorFlow + keras-cv (not installable here), so its formulas are re-implemented
below from its code, in numpy with the release's dtypes (file and line cited per function):
preprocessing (``diffseg/utils.py`` ``process_image``), the per-resolution module average
(``third_party/keras_cv/diffusion_model.py`` L49-119: ``temp / 5`` per module), the aggregation
(``diffseg/segmentor.py`` L32-64), the symmetric KL (L82-86), the merges with the first one in
float16 (L88-117) and the NMS (L119-145). The release's hard-coded 64 (the finest attention
grid at 512 px) is the tiny model's finest grid ``G`` here, and its 512 output is the input side.

The tiny model's query projections are scaled x40 (SHARPEN) so that its attention is sharp enough for the
fp16 underflow of the release to occur (as with real SD). The self-attention maps themselves come
from difffeat's capture (the keras-cv model cannot run); every step after them is compared.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common import diff, emit, images, parse_args, tiny_sd

SIDE = 256  # the tiny model's "512": attention grids 32/16/8/4 like SD's 64/32/16/8 at 512
SHARPEN = 40.0  # query scale of the tiny model: sharp attention, so fp16 underflows as with real SD


def process_image(arr: np.ndarray, side: int) -> torch.Tensor:
    """utils.py L14-25: centre crop (rows then columns, offsets floor((dim - c) / 2)), then
    tf.image.resize (bilinear, half-pixel, no antialias = torch bilinear align_corners=False)."""
    h, w = arr.shape[:2]
    c = min(h, w)
    crop = arr[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c].astype(np.float32)
    x = torch.from_numpy(crop).permute(2, 0, 1)[None]
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)[0] / 255


def module_average(maps: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """diffusion_model.py L49-119: each resolution sums its modules' maps / (number of modules)
    (1/5 for SD's 2 down + 3 up), the mid module alone; finest first. Maps [N, N] per module."""
    by_res: dict[int, list[np.ndarray]] = {}
    for m in maps.values():
        by_res.setdefault(m.shape[-1], []).append(m[0].double().numpy())
    return [sum(ms) / len(ms) for _, ms in sorted(by_res.items(), reverse=True)]


def aggregate_weights(weight_list: list[np.ndarray]) -> np.ndarray:
    """segmentor.py L32-64 (get_weight_rato + aggregate_weights), 64 -> G."""
    G = int(np.sqrt(weight_list[0].shape[-1]))
    ratio = np.array([np.sqrt(w.shape[-2]) for w in weight_list])
    ratio = ratio / ratio.sum()
    out = np.zeros((G, G, G, G))
    for r, weights in zip(ratio, weight_list):
        size = int(np.sqrt(weights.shape[-1]))
        up = G // size
        w = torch.from_numpy(weights.reshape(-1, 1, size, size))
        w = F.interpolate(w, scale_factor=up, mode="bilinear", align_corners=False).numpy()  # UpSampling2D
        w = w.reshape(size, size, G, G)
        w = w / w.sum((2, 3), keepdims=True)
        w = np.repeat(np.repeat(w, up, 0), up, 1)
        out += w * r
    return out


def kl(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """segmentor.py L82-86, in the inputs' dtype, log without epsilon."""
    with np.errstate(all="ignore"):
        q = np.log(x) - np.log(y)
        return (x * q).sum((-2, -1)) / 2 - (y * q).sum((-2, -1)) / 2


def sampling_grid(G: int, n: int) -> np.ndarray:
    """segmentor.py L22-30 (63 = G - 1)."""
    seg = (G - 1) // (n - 1)
    total = seg * (n - 1)
    start = (G - 1 - total) // 2
    xs = np.linspace(start, total + start, n)
    gx, gy = np.meshgrid(xs, xs, indexing="ij")
    return np.concatenate([gx.reshape(-1, 1), gy.reshape(-1, 1)], -1).astype(int)


def merge(attns: np.ndarray, taus: list[float], points: int) -> np.ndarray:
    """segmentor.py L88-117 + generate_masks' loop: the first merge in float16, the rest in float64."""
    G = attns.shape[0]
    grid = sampling_grid(G, points)
    anchors = attns[grid[:, 0], grid[:, 1]][:, None]  # A x 1 x G x G
    flat = attns.reshape(1, G * G, G, G)
    split = int(np.sqrt(len(grid)))
    kl_bin = np.concatenate([kl(anchors[i * split:(i + 1) * split].astype(np.float16), flat.astype(np.float16)) < taus[0]
                             for i in range(split)], 0).astype(np.float64)
    with np.errstate(all="ignore"):
        props = (kl_bin @ flat.reshape(G * G, -1) / kl_bin.sum(1, keepdims=True)).reshape(-1, G, G)
    for t in taus[1:]:
        matched, new = set(), []
        for i, anchor in enumerate(props):
            if i in matched:
                continue
            matched.add(i)
            b = kl(anchor, props) < t
            if b.sum() > 0:
                matched.update(np.arange(len(props))[b].tolist())
                new.append(props[b].mean(0))
        props = np.array(new)
    return props


def nms(props: np.ndarray, side: int) -> np.ndarray:
    """segmentor.py L139-143: bilinear upsampling to the output, argmax over proposals."""
    up = F.interpolate(torch.from_numpy(props)[None], size=(side, side), mode="bilinear", align_corners=False)[0]
    return up.argmax(0).numpy()


def first_appearance(labels: np.ndarray) -> np.ndarray:
    _, first = np.unique(labels.ravel(), return_index=True)
    order = np.argsort(first)
    lut = np.empty(labels.max() + 1, dtype=np.int64)
    lut[np.unique(labels.ravel())[order]] = np.arange(len(order))
    return lut[labels]


def main() -> None:
    args = parse_args("diffseg", __doc__)
    import difffeat
    from sklearn.metrics import adjusted_rand_score

    from difffeat.heads.diffseg import aggregate, diffseg_segment, self_attention_layers
    from difffeat.io import prepare_image, tensor_to_pil

    bb = tiny_sd()
    with torch.no_grad():
        for m in bb.denoiser.modules():
            if type(m).__name__ == "Attention" and not m.is_cross_attention:
                m.to_q.weight.mul_(SHARPEN)
    wide = images(1, 320, args.seed)[0, :, 32:288, :]  # 320 x 256: non-square
    pil = tensor_to_pil(wide)
    ref_x = process_image(np.asarray(pil), SIDE)
    ours_x = prepare_image(pil, SIDE, "crop").image
    layers = [f"attn.self.{n}" for n in self_attention_layers(bb.denoiser)]
    ex = difffeat.create(bb.source, backbone=bb, layers=layers, timesteps=[300], noise="clean", latent="mean",
                         resolution=SIDE, resize="crop")
    maps = ex(ours_x[None])
    ref_agg = aggregate_weights(module_average(maps)).reshape(-1, (SIDE // 8) ** 2)
    ours_agg = aggregate(list(maps.values()))[0]
    taus = [1.1] * 3
    ref_seg = first_appearance(nms(merge(ref_agg.reshape((SIDE // 8,) * 4), taus, 16), SIDE))
    rel = diffseg_segment(maps, out_size=(SIDE, SIDE), tau=1.1, points=16, kl_precision="release-fp16")[0].numpy()
    f32 = diffseg_segment(maps, out_size=(SIDE, SIDE), tau=1.1, points=16, kl_precision="fp32")[0].numpy()
    anchors16 = ref_agg.reshape((SIDE // 8,) * 4)[tuple(sampling_grid(SIDE // 8, 16).T)].astype(np.float16)
    nan_frac = float(np.isnan(kl(anchors16[:, None], ref_agg.reshape(1, -1, SIDE // 8, SIDE // 8).astype(np.float16))).mean())
    d = diff(torch.from_numpy(ours_agg.numpy()), torch.from_numpy(ref_agg))
    emit("diffseg", "google/diffseg segmentor.py + utils.py + keras_cv diffusion_model.py (re-implemented: TensorFlow)",
         args.ref, max_abs=d["max_abs"], rel_l2=d["rel_l2"], preprocess_max_abs=diff(ours_x, ref_x)["max_abs"],
         agreement=f"{int((rel == ref_seg).sum())}/{rel.size} pixels identical (release-fp16 mode)",
         ari_release_fp16=float(adjusted_rand_score(ref_seg.ravel(), rel.ravel())),
         ari_fp32_mode=float(adjusted_rand_score(ref_seg.ravel(), f32.ravel())),
         segments={"reference": int(ref_seg.max() + 1), "release-fp16": int(rel.max() + 1), "fp32": int(f32.max() + 1)},
         fp16_kl_nan_fraction=nan_frac)


if __name__ == "__main__":
    main()
