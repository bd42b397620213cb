"""Tiny random-weight diffusion models built from config dicts, saved in diffusers layout.

Like diffusers' own tests, every model here has the real architecture family with
tiny widths; they are saved with ``save_pretrained`` and loaded back through
``difffeat.load_backbone`` (the public loader) in the tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

BYTE_CHARS = None


def _byte_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(path: Path) -> int:
    """A tiny CLIP BPE vocabulary (bytes, bytes+</w>, specials; no merges). Returns vocab size."""
    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)
    tok.save_pretrained(str(path))
    return len(vocab)


def _text_encoder(vocab: int, hidden: int, with_projection: bool = False):  # type: ignore[no-untyped-def]
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _vae():  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=64,
    )


def _scheduler(prediction_type: str):  # type: ignore[no-untyped-def]
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def _save(root: Path, comps: dict, pipeline_class: str) -> Path:  # type: ignore[type-arg]
    import diffusers

    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__}
    for name, obj in comps.items():
        if obj is None:
            index[name] = [None, None]
            continue
        lib = "transformers" if type(obj).__module__.startswith("transformers") else "diffusers"
        index[name] = [lib, type(obj).__name__]
        if hasattr(obj, "save_pretrained"):
            obj.save_pretrained(str(root / name))
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def build_tiny_sd(root: Path, prediction_type: str = "epsilon") -> Path:
    """SD-1.x/2.x-shaped pipeline: 4 UNet blocks (like SD), VAE x8, CLIP text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    vocab = write_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    comps = {
        "unet": unet, "vae": _vae(), "text_encoder": _text_encoder(vocab, 32),
        "tokenizer": CLIPTokenizer.from_pretrained(str(root / "tokenizer")), "scheduler": _scheduler(prediction_type),
    }
    return _save(root, comps, "StableDiffusionPipeline")


def build_tiny_sdxl(root: Path) -> Path:
    """SDXL-shaped: 3 UNet blocks, text_time added conditioning, two text encoders."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    vocab = write_tokenizer(root / "tokenizer")
    write_tokenizer(root / "tokenizer_2")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32, transformer_layers_per_block=1,
    )
    comps = {
        "unet": unet, "vae": _vae(), "text_encoder": _text_encoder(vocab, 32),
        "text_encoder_2": _text_encoder(vocab, 32, with_projection=True),
        "tokenizer": CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
        "tokenizer_2": CLIPTokenizer.from_pretrained(str(root / "tokenizer_2")),
        "scheduler": _scheduler("epsilon"),
    }
    return _save(root, comps, "StableDiffusionXLPipeline")


def build_tiny_pixel(root: Path, num_classes: int | None = None) -> Path:
    """Pixel-space UNet2DModel (ADM-like), optionally class-conditional (num_classes + 1 null)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=4,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )
    return _save(root, {"unet": unet, "scheduler": DDPMScheduler(num_train_timesteps=1000)}, "DDPMPipeline")


# --------------------------------------------------------------------------- transformers (issue 3)
def write_t5_tokenizer(path: Path) -> int:
    """A tiny T5 (Unigram) tokenizer: <pad>=0, </s>=1, <unk>=2, '▁', ASCII characters. Returns vocab size."""
    import string

    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("▁" + c, -1.5) for c in string.ascii_lowercase]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    tok.save_pretrained(str(path))
    return len(vocab)


def _t5_encoder(vocab: int, d_model: int):  # type: ignore[no-untyped-def]
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg)


def _rename_class(root: Path, component: str, legacy: str) -> None:
    """Store a component under a legacy class name (as hub checkpoints do); diffusers remaps it."""
    cfg_path = root / component / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = legacy
    cfg_path.write_text(json.dumps(cfg, indent=2))
    index = json.loads((root / "model_index.json").read_text())
    index[component] = ["diffusers", legacy]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def build_tiny_dit(root: Path, num_classes: int = 4) -> Path:
    """DiT-shaped (facebook/DiT-XL-2-256 layout): 3 blocks, patch 2, learned sigma, class labels + null.

    Saved as ``Transformer2DModel`` like the hub checkpoint; diffusers remaps it to
    ``DiTTransformer2DModel`` on load.
    """
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes)
    sched = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    _save(root, {"transformer": dit, "vae": _vae(), "scheduler": sched}, "DiTPipeline")
    _rename_class(root, "transformer", "Transformer2DModel")
    return root


def build_tiny_pixart(root: Path, sigma: bool = True, size_conditioning: bool = True) -> Path:
    """PixArt-shaped: 2 blocks with self + cross attention to a tiny T5, adaLN-single, learned sigma."""
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Tokenizer

    vocab = write_t5_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    tr = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
                                  num_layers=2, cross_attention_dim=24, sample_size=8, patch_size=2,
                                  caption_channels=24, norm_num_groups=4, use_additional_conditions=size_conditioning)
    comps = {
        "transformer": tr, "vae": _vae(), "text_encoder": _t5_encoder(vocab, 24),
        "tokenizer": T5Tokenizer.from_pretrained(str(root / "tokenizer")),
        "scheduler": DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    }
    return _save(root, comps, "PixArtSigmaPipeline" if sigma else "PixArtAlphaPipeline")


def build_tiny_sd3(root: Path, with_t5: bool = True, sd35: bool = True) -> Path:
    """SD3.5-shaped (``sd35=False``: SD3-medium-shaped): 2 joint blocks (block 0 with SD3.5's extra
    image attention, RMS qk-norm), 16-channel VAE with shift, CLIP-L/G-like encoders with
    projections, optional T5, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTokenizer, T5Tokenizer

    vocab = write_tokenizer(root / "tokenizer")
    write_tokenizer(root / "tokenizer_2")
    t5_vocab = write_t5_tokenizer(root / "tokenizer_3")
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16,
                               pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16,
                               dual_attention_layers=(0,) if sd35 else (), qk_norm="rms_norm" if sd35 else None)
    vae = _vae16(scaling_factor=1.5305, shift_factor=0.0609)
    comps = {
        "transformer": tr, "vae": vae,
        "text_encoder": _text_encoder(vocab, 32, with_projection=True),
        "text_encoder_2": _text_encoder(vocab, 32, with_projection=True),
        "text_encoder_3": _t5_encoder(t5_vocab, 48) if with_t5 else None,
        "tokenizer": CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
        "tokenizer_2": CLIPTokenizer.from_pretrained(str(root / "tokenizer_2")),
        "tokenizer_3": T5Tokenizer.from_pretrained(str(root / "tokenizer_3")) if with_t5 else None,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }
    return _save(root, comps, "StableDiffusion3Pipeline")


def _vae16(**kw):  # type: ignore[no-untyped-def]
    """A 16-channel x8 VAE with a latent shift (SD3's and FLUX's layout)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=64, **kw)


# FLUX.1's scheduler config (black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)


def build_tiny_flux(root: Path, guidance: bool = True, with_t5: bool = True) -> Path:
    """FLUX.1-shaped (``guidance=True``: dev, False: schnell): 2 double-stream + 3 single-stream
    blocks, 16-channel VAE packed 2x2 (in_channels 64), RoPE axes, CLIP (pooled) + optional T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5Tokenizer

    vocab = write_tokenizer(root / "tokenizer")
    t5_vocab = write_t5_tokenizer(root / "tokenizer_2")
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=3, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=32,
                                guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    comps = {
        "transformer": tr, "vae": _vae16(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                         use_post_quant_conv=False),
        "text_encoder": _text_encoder(vocab, 32),
        "text_encoder_2": _t5_encoder(t5_vocab, 24) if with_t5 else None,
        "tokenizer": CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
        "tokenizer_2": T5Tokenizer.from_pretrained(str(root / "tokenizer_2")) if with_t5 else None,
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
    }
    return _save(root, comps, "FluxPipeline")


def two_region_image(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, int]:
    """A noisy [size, size, 3] uint8 image, red left of a random column x0 and blue right of it,
    and x0 (the dense-training tests' data: masks, depth and edges follow from x0)."""
    x0 = int(rng.integers(16, 48))
    img = np.zeros((size, size, 3), np.float64)
    img[:] = (30, 60, 200)
    img[:, :x0] = (220, 40, 30)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8), x0


class GaussianDenoiser(torch.nn.Module):
    """The exact ε-predictor for data x_0 ~ N(mean, std²) per channel (weights-free, so golden
    numbers made with it do not move with a library's initialisation; a mean outside [-1, 1] makes
    x̂_0 leave [-1, 1] at high noise, so clipping matters):
    ε*(x_t, t) = sqrt(1-ᾱ) (x_t - sqrt(ᾱ) mean) / (ᾱ std² + 1 - ᾱ). Called like a diffusers UNet
    (``forward(x, timestep, return_dict=False)``); every call is counted in ``calls``."""

    def __init__(self, alphas_cumprod: torch.Tensor, mean: tuple[float, ...] = (1.4, -1.3, 0.2),
                 std: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("ac", alphas_cumprod.detach().float().clone())
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.std, self.calls, self.timesteps = float(std), 0, []  # type: ignore[var-annotated]
        self.config = {"patch_size": 1}  # what a backbone reads of a denoiser without down blocks

    def forward(self, x, timestep, return_dict=False, **kw):  # type: ignore[no-untyped-def]
        t = torch.as_tensor(timestep).long().reshape(-1).expand(x.shape[0])
        self.calls += 1
        self.timesteps.append(int(t[0]))
        a = self.ac[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x.float() - a.sqrt() * self.mean) / (a * self.std**2 + 1 - a)
        return (eps.to(x.dtype),)
