"""DiffusionBackbone: a loaded denoiser and the primitives every method needs.

One class serves SD 1.x/2.x (eps and v), SDXL, pixel-space ``UNet2DModel``
(unconditional or class-conditional) and the transformers DiT (class-conditional,
null class = ``num_classes``), PixArt-α/Σ (T5) and SD3/SD3.5 (flow matching, CLIP-L +
CLIP-G + optional T5). Methods never call diffusers directly; they use

* :meth:`encode` / :meth:`decode` — the VAE, run once per image;
* :meth:`conditioning` — text (cached per prompt string), class labels or none;
* :meth:`add_noise` / :meth:`target` — the forward process and the regression target,
  following the scheduler (epsilon, v-prediction, sample, or flow matching);
* :meth:`predict` — one denoiser call.

Everything that differs between families (text encoding, conditioning, layer names, token
streams, timestep input, compile targets) is delegated to a family adapter
(:mod:`difffeat.families`), found by :func:`difffeat.families.family_of`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import torch
from torch import nn

from .components import ModelParts, place
from .conditioning import Conditioning, batch_rows
from .errors import BadInputError, DiffFeatError
from .families import Family, family_of
from .io import load_features, save_features
from .loading import DENOISER_KEYS, load_component, read_model_index

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` picks bf16 on CUDA and fp32 on CPU (CPU bf16 convolutions are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise BadInputError(f"unknown dtype {dtype!r}; valid: fp32, fp16, bf16")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    """The device to load on: :func:`difffeat.distributed.resolve_device` (rank-aware)."""
    from .distributed import resolve_device

    return resolve_device(device)


class DiffusionBackbone(nn.Module):
    """A diffusion model with VAE/text encoders/scheduler and uniform primitives.

    Family knowledge (text encoding, conditioning, layer naming, token streams, timestep
    input, compile targets) lives in ``self.adapter``, a :class:`difffeat.families.Family`.
    """

    def __init__(
        self,
        source: str,
        components: dict[str, Any],
        index: dict[str, Any],
        dtype: torch.dtype,
        device: torch.device,
        random_weights: bool = False,
        name: str | None = None,
        use_t5: bool = True,
        prompt_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.source, self.name = source, name or source
        self.denoiser_weights: str | None = None  # a swapped-in state dict (load_backbone(denoiser_weights=))
        self.use_t5, self.prompt_cache_dir = use_t5, prompt_cache
        self.dtype_, self.device_ = dtype, device
        self._index, self._random = index, random_weights
        key = next((k for k in DENOISER_KEYS if components.get(k) is not None), None)
        if key is None:
            raise DiffFeatError(f"{source} has no denoiser (unet/transformer) in model_index.json")
        self.denoiser: nn.Module = place(components[key], device, dtype)
        family = family_of(self.denoiser, source)
        if device.type == "cuda":
            _speed_up(self.denoiser)
        vae = components.get("vae")
        self.vae: nn.Module | None = None if vae is None else place(vae, device, dtype)
        self.scheduler = components.get("scheduler")
        if self.scheduler is None:
            raise DiffFeatError(f"{source} has no scheduler; cannot define the noising process")
        self.parts = ModelParts(source, self.name, self.denoiser, components, index, dtype, device, random_weights, use_t5)
        self.adapter: Family = family(self.parts)
        self.family: str = family.name
        self.tokenizers = list(self.parts.tokenizers.values())
        self._prompt_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._init_noising()
        if self.vae is not None:
            vcfg = self.vae.config
            self.latent_scale = 2 ** (len(vcfg.block_out_channels) - 1)
            self.scaling_factor = float(vcfg.get("scaling_factor", 0.18215) or 0.18215)
            self.shift_factor = float(vcfg.get("shift_factor", 0.0) or 0.0)
        else:
            self.latent_scale, self.scaling_factor, self.shift_factor = 1, 1.0, 0.0
        self.num_classes: int | None = self.adapter.num_classes

    def _init_noising(self) -> None:
        cfg = self.scheduler.config
        self.num_train_timesteps: int = int(cfg.get("num_train_timesteps", 1000))
        if "FlowMatch" in type(self.scheduler).__name__:
            self.prediction_type = "flow"
            self.register_buffer("alphas_cumprod", torch.empty(0), persistent=False)
        else:
            self.prediction_type = str(cfg.get("prediction_type", "epsilon"))
            ac = getattr(self.scheduler, "alphas_cumprod", None)
            if ac is None:
                from diffusers import DDPMScheduler

                ac = DDPMScheduler.from_config(cfg).alphas_cumprod
            self.register_buffer("alphas_cumprod", ac.to(device=self.device_, dtype=torch.float32), persistent=False)

    # ------------------------------------------------------------------ description
    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.device_

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_

    @property
    def in_channels(self) -> int:
        return self.adapter.latent_channels

    @property
    def patch_size(self) -> int:
        return self.adapter.patch

    @property
    def text_length(self) -> int:
        """Text tokens the denoiser attends to (the key count of its cross-attention)."""
        return self.adapter.text_length

    @property
    def text_conditioned(self) -> bool:
        return bool(self.tokenizers) or self.adapter.text

    def layer_modules(self) -> dict[str, nn.Module]:
        """Uniform layer names -> modules (the family's naming, see :mod:`difffeat.layers`)."""
        return self.adapter.layer_modules()

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x denoiser downsampling)."""
        return self.latent_scale * self.latent_multiple

    @property
    def latent_multiple(self) -> int:
        d = self.denoiser
        if hasattr(d, "down_blocks"):
            n = sum(1 for b in d.down_blocks if getattr(b, "downsamplers", None))
            return 2**n
        return self.adapter.patch

    def check_timesteps(self, timesteps: Sequence[int]) -> list[int]:
        ts = [int(t) for t in timesteps]
        bad = [t for t in ts if not 0 <= t < self.num_train_timesteps]
        if bad or not ts:
            raise BadInputError(
                f"timestep {bad[0] if bad else '(none)'} out of range: t must be in [0, {self.num_train_timesteps})"
            )
        return ts

    # ------------------------------------------------------------------ VAE
    @torch.no_grad()
    def encode(self, images: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0,1] -> (mean, std) of the scaled latent distribution (VAE once).

        Pixel-space models return the images mapped to [-1, 1] and zero std.
        """
        x = images.to(self.device, self.dtype) * 2 - 1
        if self.vae is None:
            return x, torch.zeros_like(x)
        means, stds = [], []
        for i in range(0, x.shape[0], chunk):
            dist = self.vae.encode(x[i : i + chunk]).latent_dist
            means.append((dist.mean - self.shift_factor) * self.scaling_factor)
            stds.append(dist.std * self.scaling_factor)
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Scaled latents -> images in [0,1]."""
        z = latents.to(self.device, self.dtype)
        if self.vae is None:
            return ((z + 1) / 2).clamp(0, 1)
        out = [
            self.vae.decode(z[i : i + chunk] / self.scaling_factor + self.shift_factor).sample
            for i in range(0, z.shape[0], chunk)
        ]
        return ((torch.cat(out).float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ noising
    def _ab(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(like.device)[t.to(like.device).long()]
        return a.view(-1, *([1] * (like.dim() - 1)))

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        hw = (like.shape[-2], like.shape[-1])
        s = self.adapter.flow_sigma(t.to(like.device), hw, self.num_train_timesteps).to(torch.float32)
        return s.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0) for the model's scheduler.

        DDPM family: sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε. Flow matching (SD3, FLUX): (1-σ)·x0 + σ·ε,
        σ = the family's ``flow_sigma(t)`` (t/T; FLUX optionally with its resolution shift).
        Computed in fp32, returned in x0's dtype.
        """
        x0f, nf = x0.float(), noise.float()
        if self.prediction_type == "flow":
            s = self._sigma(t, x0f)
            out = (1 - s) * x0f + s * nf
        else:
            a = self._ab(t, x0f)
            out = a.sqrt() * x0f + (1 - a).sqrt() * nf
        return out.to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to output: ε, v = sqrt(ᾱ)ε - sqrt(1-ᾱ)x0, x0, or ε - x0 (flow)."""
        x0f, nf = x0.float(), noise.float()
        if self.prediction_type == "epsilon":
            return nf
        if self.prediction_type == "v_prediction":
            a = self._ab(t, x0f)
            return a.sqrt() * nf - (1 - a).sqrt() * x0f
        if self.prediction_type == "sample":
            return x0f
        if self.prediction_type == "flow":
            return nf - x0f
        raise DiffFeatError(f"unsupported prediction type {self.prediction_type!r}")

    def timestep_input(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep value the denoiser is fed (the family's rule; t itself so far)."""
        return self.adapter.timestep_input(t)

    # ------------------------------------------------------------------ conditioning
    def text_encoders(self) -> list[nn.Module]:
        """Text encoders, loaded on first use (prompt embeddings are then cached).

        With ``use_t5=False`` T5 encoders are never loaded: SD3 then feeds zeros for the
        T5 part (as diffusers does with ``text_encoder_3=None``); PixArt needs
        ``prompt_embeds`` or a prompt cache holding the prompt.
        """
        return list(self.parts.text_encoders().values())

    def _disk_cache_path(self, prompt: str) -> str | None:
        if not self.prompt_cache_dir or self._random:  # random text encoders differ per load
            return None
        key = json.dumps([self.source, self.family, self.text_length, self.adapter.t5_zeros, prompt])
        return os.path.join(self.prompt_cache_dir, hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")

    @torch.no_grad()
    def _embed_prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        """Embeddings of one prompt (the family's ``encode_text``), cached in memory and
        (with ``prompt_cache``) on disk."""
        if prompt in self._prompt_cache:
            return self._prompt_cache[prompt]
        path = self._disk_cache_path(prompt)
        if path is not None and os.path.exists(path):
            emb = {k: v.to(self.device) for k, v in load_features(path)[0].items()}
        else:
            emb = self.adapter.encode_text(prompt)
            if path is not None:
                save_features(path, emb, {"prompt": prompt, "source": self.source, "family": self.family})
        emb = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in emb.items()}
        self._prompt_cache[prompt] = emb
        return emb

    def _prompt_embeddings(self, prompts: Sequence[str] | str | None, batch: int, prompt_embeds: torch.Tensor | None,
                           pooled: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        if prompt_embeds is not None:
            return {"encoder_hidden_states": prompt_embeds.to(self.device, self.dtype), "pooled": pooled, "attention_mask": mask}
        plist = [prompts or ""] * batch if prompts is None or isinstance(prompts, str) else list(prompts)
        if len(plist) != batch:
            raise BadInputError(f"got {len(plist)} prompts for {batch} images")
        embs = [self._embed_prompt(p) for p in plist]
        return {k: torch.cat([e[k] for e in embs]) if k in embs[0] else None
                for k in ("encoder_hidden_states", "pooled", "attention_mask")}

    def conditioning(
        self,
        prompts: Sequence[str] | str | None = None,
        class_labels: Sequence[int] | torch.Tensor | int | None = None,
        batch: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        image_size: tuple[int, int] | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
    ) -> Conditioning:
        """Denoiser keyword arguments for a batch of ``batch`` images.

        ``prompts`` may be one string (shared) or one per image; embeddings are cached per
        unique string. ``prompt_embeds`` ([B or 1, L, D]) bypasses the text encoder
        (SDXL/SD3 also need ``pooled_prompt_embeds``; PixArt takes ``prompt_attention_mask``
        [B or 1, L], default all ones). ``class_labels`` selects classes of class-conditional
        models (None = null class). ``image_size`` (H, W) feeds SDXL's size conditioning and
        PixArt-α's resolution/aspect-ratio conditioning. The family adapter builds the kwargs.
        """
        if self.adapter.text:
            emb = self._prompt_embeddings(prompts, batch, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask)
            return Conditioning(self.adapter.text_kwargs(emb, batch, image_size or (1024, 1024)), batch)
        return Conditioning(self.adapter.label_kwargs(class_labels, batch), batch)

    # ------------------------------------------------------------------ denoiser
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One denoiser call; returns the model output (same shape as ``x_t``)."""
        self.adapter.check_input(x_t)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        # timestep by keyword (PixArt/SD3 take encoder_hidden_states second); the family packs (FLUX)
        x_in, kwargs = self.adapter.denoiser_inputs(x_t.to(self.dtype), t, dict(cond.kwargs), self.num_train_timesteps)
        out = self.adapter.denoiser_output(self.denoiser(x_in, **kwargs, return_dict=False)[0], x_t)
        if out.shape[1] != x_t.shape[1]:  # learned-sigma models (DiT) predict [eps, var]
            out = out[:, : x_t.shape[1]]
        return out

    def dummy_conditioning(self, batch: int, image_size: tuple[int, int]) -> Conditioning:
        """Zero conditioning of the right shapes (used to probe layer shapes without a text encoder)."""
        if self.adapter.text:
            z = self.adapter.dummy_text()
            return self.conditioning(batch=batch, prompt_embeds=z["encoder_hidden_states"],
                                     pooled_prompt_embeds=z.get("pooled"), image_size=image_size)
        return self.conditioning(batch=batch, image_size=image_size)


def allow_recompiles(limit: int = 64) -> None:
    """Let dynamo keep one compiled graph per block shape.

    Every ``ResnetBlock2D`` (or transformer block) of a denoiser shares one ``forward`` code
    object, and dynamo's default limit is 8 graphs per code object: the SD-2.1 UNet's
    resnets see 23 (channels, size) signatures, so without this the rest silently run eager.
    """
    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, max(int(getattr(cfg, key)), limit))
    for key in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, max(int(getattr(cfg, key)), 8 * limit))


def compile_denoiser(bb: "DiffusionBackbone", mode: str | None = None) -> None:
    """``torch.compile`` the whole denoiser in place, for callers that need only its output
    (Diffusion Classifier, DDIM/DIRE). Hooked feature extraction compiles blocks instead
    (:meth:`difffeat.extractor.FeatureExtractor.compile_denoiser`).

    ``mode``: torch.compile's mode (``None`` = default; ``"max-autotune"`` adds CUDA graphs
    and GEMM autotuning). Give the denoiser one batch shape: each new shape recompiles.
    """
    allow_recompiles()
    try:
        bb.denoiser.compile(mode=mode, dynamic=False)
    except Exception as e:  # pragma: no cover - depends on the toolchain
        raise DiffFeatError(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _speed_up(denoiser: nn.Module) -> None:
    """Exact speed-ups on GPU: fused QKV projections (where the family says they are exact)
    and channels-last convolutions."""
    if hasattr(denoiser, "fuse_qkv_projections") and family_of(denoiser).fuses_qkv(denoiser):
        try:
            denoiser.fuse_qkv_projections()
        except Exception:  # some attention processors (e.g. custom) cannot fuse; keep them
            pass
    if hasattr(denoiser, "conv_in"):
        denoiser.to(memory_format=torch.channels_last)


def load_backbone(
    name_or_path: str = "difffeat-tiny",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    random_weights: bool = False,
    use_t5: bool = True,
    prompt_cache: str | None = None,
    denoiser_weights: str | None = None,
    time_shift: bool = False,
) -> DiffusionBackbone:
    """Load a diffusion backbone by preset name, local diffusers folder or hub id.

    ``use_t5=False`` never loads T5 text encoders (SD3: zeros for the T5 tokens, as
    diffusers with ``text_encoder_3=None``; PixArt: prompts must come as ``prompt_embeds``
    or from the prompt cache). ``prompt_cache`` is a folder where prompt embeddings are
    stored as safetensors, one file per (model, prompt), and read back instead of running
    the text encoders (not used with ``random_weights``). ``denoiser_weights`` (``FILE`` or
    ``REPO:FILE``, safetensors) replaces the denoiser's weights with a diffusers-format state
    dict, e.g. CleanDIFT's UNets (:mod:`difffeat.denoiser_weights`). ``time_shift`` (FLUX) reads
    a user's t as a position on the unshifted schedule and applies the pipeline's
    resolution-dependent shift (:mod:`difffeat.families.flux`); default: σ = t / 1000.
    """
    from .registry import resolve

    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    source, preset = resolve(name_or_path)
    index = read_model_index(source)
    comps: dict[str, Any] = {}
    for key, spec in index.items():
        if key.startswith("_") or not isinstance(spec, (list, tuple)) or key.startswith("text_encoder"):
            continue
        if key in ("safety_checker", "feature_extractor", "image_encoder"):
            continue
        comps[key] = load_component(source, key, list(spec), dt, random_weights)
    if denoiser_weights:  # before the backbone fuses QKV projections (that renames weights)
        from .denoiser_weights import swap_denoiser_weights

        key = next((k for k in DENOISER_KEYS if comps.get(k) is not None), None)
        if key is not None:
            swap_denoiser_weights(comps[key], denoiser_weights)
    bb = DiffusionBackbone(source, comps, index, dt, dev, random_weights, name=preset.name if preset else name_or_path,
                           use_t5=use_t5, prompt_cache=prompt_cache)
    bb.denoiser_weights = denoiser_weights
    if time_shift:
        if not bb.adapter.supports_time_shift:
            raise BadInputError(f"time_shift applies to FLUX's resolution-dependent schedule; {bb.name} is {bb.family}")
        bb.adapter.time_shift = True
    return bb


__all__ = ["DiffusionBackbone", "Conditioning", "allow_recompiles", "compile_denoiser", "load_backbone", "parse_dtype",
           "parse_device", "batch_rows"]
