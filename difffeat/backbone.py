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
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import BadInputError, DiffFeatError
from .io import load_features, save_features
from .loading import DENOISER_KEYS, load_component, read_model_index

TEXT_ENCODER_KEYS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_FAMILIES = ("sd", "sdxl", "sd3", "pixart")
SD3_T5_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length default

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


def _tree_map(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    return obj


@dataclass
class Conditioning:
    """Keyword arguments for the denoiser, every tensor with the batch first.

    ``kwargs`` holds e.g. ``encoder_hidden_states``, ``added_cond_kwargs`` or
    ``class_labels``. An empty dict means unconditional.
    """

    kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1

    def select(self, idx: torch.Tensor | Sequence[int] | slice) -> "Conditioning":
        if isinstance(idx, slice):
            n = len(range(*idx.indices(self.batch_size)))
            return Conditioning(_tree_map(lambda t: t[idx], self.kwargs), n)
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return Conditioning(_tree_map(lambda t: t[idx_t.to(t.device)], self.kwargs), len(idx_t))

    def repeat_interleave(self, n: int) -> "Conditioning":
        return Conditioning(_tree_map(lambda t: t.repeat_interleave(n, dim=0), self.kwargs), self.batch_size * n)

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        first = items[0].kwargs

        def merge(path: tuple[str, ...], ref: Any) -> Any:
            if isinstance(ref, dict):
                return {k: merge(path + (k,), v) for k, v in ref.items()}
            if isinstance(ref, torch.Tensor):
                parts = []
                for it in items:
                    v: Any = it.kwargs
                    for p in path:
                        v = v[p]
                    parts.append(v)
                return torch.cat(parts, dim=0)
            return ref

        return Conditioning(merge((), first), sum(it.batch_size for it in items))


class DiffusionBackbone(nn.Module):
    """A diffusion model with VAE/text encoders/scheduler and uniform primitives."""

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
        self.use_t5, self.prompt_cache_dir = use_t5, prompt_cache
        self.dtype_, self.device_ = dtype, device
        self._index, self._random = index, random_weights
        key = next((k for k in DENOISER_KEYS if components.get(k) is not None), None)
        if key is None:
            raise DiffFeatError(f"{source} has no denoiser (unet/transformer) in model_index.json")
        self.denoiser: nn.Module = _place(components[key], device, dtype)
        if device.type == "cuda":
            _speed_up(self.denoiser)
        vae = components.get("vae")
        self.vae: nn.Module | None = None if vae is None else _place(vae, device, dtype)
        self.scheduler = components.get("scheduler")
        if self.scheduler is None:
            raise DiffFeatError(f"{source} has no scheduler; cannot define the noising process")
        self._tokenizer_by_key = {k: components[k] for k in ("tokenizer", "tokenizer_2", "tokenizer_3") if components.get(k) is not None}
        self.tokenizers = list(self._tokenizer_by_key.values())
        self._text_encoders: dict[str, nn.Module] | None = None
        self._prompt_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.family = self._detect_family()
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
            self.register_buffer("alphas_cumprod", ac.to(device=device, dtype=torch.float32), persistent=False)
        if self.vae is not None:
            vcfg = self.vae.config
            self.latent_scale = 2 ** (len(vcfg.block_out_channels) - 1)
            self.scaling_factor = float(vcfg.get("scaling_factor", 0.18215) or 0.18215)
            self.shift_factor = float(vcfg.get("shift_factor", 0.0) or 0.0)
        else:
            self.latent_scale, self.scaling_factor, self.shift_factor = 1, 1.0, 0.0
        dcfg = self.denoiser.config
        self.num_classes: int | None = (dcfg.get("num_class_embeds") or dcfg.get("num_embeds_ada_norm")) if self.family in ("pixel", "dit") else None

    # ------------------------------------------------------------------ description
    def _detect_family(self) -> str:
        cls = type(self.denoiser).__name__
        cfg = self.denoiser.config
        if cls == "UNet2DConditionModel":
            return "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd"
        if cls == "UNet2DModel":
            return "pixel"
        if cls == "SD3Transformer2DModel":
            return "sd3"
        if cls == "PixArtTransformer2DModel":
            return "pixart"
        if cls in ("DiTTransformer2DModel", "Transformer2DModel"):
            return "pixart" if cfg.get("norm_type") == "ada_norm_single" else "dit"
        raise DiffFeatError(f"unsupported denoiser class {cls} in {self.source}")

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.device_

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_

    @property
    def in_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def text_length(self) -> int:
        """Text tokens the denoiser attends to (the key count of its cross-attention)."""
        clip = int(self._tokenizer_by_key["tokenizer"].model_max_length) if "tokenizer" in self._tokenizer_by_key else 77
        if self.family == "sd3":
            return 77 + SD3_T5_LENGTH
        if self.family == "pixart":  # the pipelines' max_sequence_length defaults
            return 300 if "Sigma" in str(self._index.get("_class_name", "")) else 120
        return clip

    @property
    def text_conditioned(self) -> bool:
        return bool(self.tokenizers) or self.family in ("sd", "sdxl", "sd3", "pixart")

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
        return int(d.config.get("patch_size", 1) or 1)

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
        s = t.to(like.device, torch.float32) / self.num_train_timesteps
        return s.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0) for the model's scheduler.

        DDPM family: sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε. Flow matching (SD3): (1-σ)·x0 + σ·ε, σ = t/T.
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
        """The timestep value the denoiser is fed (t itself for all supported families)."""
        return t.to(self.device)

    # ------------------------------------------------------------------ conditioning
    def _encoder_map(self) -> dict[str, nn.Module]:
        if self._text_encoders is None:
            encs = {}
            for key in TEXT_ENCODER_KEYS:
                spec = self._index.get(key)
                if not spec or spec[0] is None or (not self.use_t5 and str(spec[1]).startswith("T5")):
                    continue
                m = load_component(self.source, key, spec, self.dtype, self._random)
                encs[key] = _place(m, self.device, self.dtype)
            self._text_encoders = encs
        return self._text_encoders

    def text_encoders(self) -> list[nn.Module]:
        """Text encoders, loaded on first use (prompt embeddings are then cached).

        With ``use_t5=False`` T5 encoders are never loaded: SD3 then feeds zeros for the
        T5 part (as diffusers does with ``text_encoder_3=None``); PixArt needs
        ``prompt_embeds`` or a prompt cache holding the prompt.
        """
        return list(self._encoder_map().values())

    def _tokenize(self, key: str, prompt: str, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self._tokenizer_by_key.get(key.replace("text_encoder", "tokenizer"))
        if tok is None:
            raise DiffFeatError(f"{self.name} has no tokenizer for {key}; pass prompt_embeds instead of a prompt")
        out = tok([prompt], padding="max_length", max_length=max_length or tok.model_max_length, truncation=True,
                  add_special_tokens=True, return_tensors="pt")
        return out.input_ids.to(self.device), out.attention_mask.to(self.device)

    def _encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        """One prompt -> {encoder_hidden_states [1,L,D], pooled [1,P]?, attention_mask [1,L]?}.

        Follows each diffusers pipeline's ``encode_prompt``: SD 1/2 last hidden state; SDXL
        penultimate hidden states of both CLIPs concatenated, pooled from the projection
        encoder; SD3 the same for CLIP-L/G (pooled concatenated), zero-padded to the T5 width
        and followed by 256 T5 tokens (zeros without T5); PixArt T5 with its attention mask.
        """
        encs = self._encoder_map()
        if self.family == "pixart":
            if "text_encoder" not in encs:
                raise DiffFeatError(f"{self.name} runs without its T5 text encoder; pass prompt_embeds and prompt_attention_mask, or a prompt cache holding {prompt!r}")
            ids, mask = self._tokenize("text_encoder", prompt, self.text_length)
            return {"encoder_hidden_states": encs["text_encoder"](ids, attention_mask=mask)[0], "attention_mask": mask}
        clips = [k for k in TEXT_ENCODER_KEYS if k in encs and not type(encs[k]).__name__.startswith("T5")]
        if not clips:
            raise DiffFeatError(f"{self.name} has no text encoder; pass prompt_embeds instead of a prompt")
        if self.family == "sd":
            return {"encoder_hidden_states": encs[clips[0]](self._tokenize(clips[0], prompt)[0])[0]}
        hidden, pooled = [], []
        for key in clips:
            out = encs[key](self._tokenize(key, prompt)[0], output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if getattr(out, "text_embeds", None) is not None:
                pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        if self.family == "sdxl":  # pooled: the first encoder with a projection (text_encoder_2)
            return {"encoder_hidden_states": clip, "pooled": pooled[0]}
        dim = int(self.denoiser.config.joint_attention_dim)
        if "text_encoder_3" in encs:
            t5 = encs["text_encoder_3"](self._tokenize("text_encoder_3", prompt, SD3_T5_LENGTH)[0])[0]
        else:
            t5 = torch.zeros(1, SD3_T5_LENGTH, dim, device=self.device, dtype=clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, dim - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=1), "pooled": torch.cat(pooled, dim=-1)}

    def _disk_cache_path(self, prompt: str) -> str | None:
        if not self.prompt_cache_dir or self._random:  # random text encoders differ per load
            return None
        t5_zeros = self.family == "sd3" and not self.use_t5  # (PixArt cannot embed without T5 at all)
        key = json.dumps([self.source, self.family, self.text_length, t5_zeros, prompt])
        return os.path.join(self.prompt_cache_dir, hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")

    @torch.no_grad()
    def _embed_prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        """Embeddings of one prompt, cached in memory and (with ``prompt_cache``) on disk."""
        if prompt in self._prompt_cache:
            return self._prompt_cache[prompt]
        path = self._disk_cache_path(prompt)
        if path is not None and os.path.exists(path):
            emb = {k: v.to(self.device) for k, v in load_features(path)[0].items()}
        else:
            emb = self._encode_text(prompt)
            if path is not None:
                save_features(path, emb, {"prompt": prompt, "source": self.source, "family": self.family})
        emb = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in emb.items()}
        self._prompt_cache[prompt] = emb
        return emb

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
        PixArt-α's resolution/aspect-ratio conditioning.
        """
        kw: dict[str, Any] = {}
        if self.family in TEXT_FAMILIES:
            if prompt_embeds is not None:
                ehs = prompt_embeds.to(self.device, self.dtype)
                pooled, mask = pooled_prompt_embeds, prompt_attention_mask
            else:
                plist = [prompts or ""] * batch if prompts is None or isinstance(prompts, str) else list(prompts)
                if len(plist) != batch:
                    raise BadInputError(f"got {len(plist)} prompts for {batch} images")
                embs = [self._embed_prompt(p) for p in plist]
                ehs = torch.cat([e["encoder_hidden_states"] for e in embs])
                pooled = torch.cat([e["pooled"] for e in embs]) if "pooled" in embs[0] else None
                mask = torch.cat([e["attention_mask"] for e in embs]) if "attention_mask" in embs[0] else None
            kw["encoder_hidden_states"] = _batch(ehs, batch)
            h, w = image_size or (1024, 1024)
            if self.family in ("sdxl", "sd3"):
                if pooled is None:
                    raise BadInputError(f"{self.family.upper()} needs pooled_prompt_embeds together with prompt_embeds")
                pooled = _batch(pooled.to(self.device, self.dtype), batch)
                if self.family == "sd3":
                    kw["pooled_projections"] = pooled
                else:
                    time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.dtype).expand(batch, -1)
                    kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
            if self.family == "pixart":
                if mask is None:
                    mask = torch.ones(ehs.shape[:2], dtype=torch.long)
                kw["encoder_attention_mask"] = _batch(mask.to(self.device), batch)
                kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
                if getattr(self.denoiser, "use_additional_conditions", False):  # PixArt-α 1024: size conditioning
                    kw["added_cond_kwargs"] = {
                        "resolution": torch.tensor([[h, w]], device=self.device, dtype=self.dtype).expand(batch, -1),
                        "aspect_ratio": torch.tensor([[h / w]], device=self.device, dtype=self.dtype).expand(batch, -1),
                    }
        elif self.num_classes:
            null = int(self.num_classes) - 1 if self.family == "pixel" else int(self.num_classes)
            if class_labels is None:
                labels = torch.full((batch,), null, dtype=torch.long)
            else:
                labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
                if labels.numel() == 1 and batch > 1:
                    labels = labels.expand(batch)
                if labels.numel() != batch:
                    raise BadInputError(f"got {labels.numel()} class labels for {batch} images")
                limit = int(self.num_classes)
                if (labels < 0).any() or (labels >= limit + (self.family == "dit")).any():
                    raise BadInputError(f"class label out of range [0, {limit}) for {self.name}")
            kw["class_labels"] = labels.to(self.device)
        return Conditioning(kw, batch)

    # ------------------------------------------------------------------ denoiser
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One denoiser call; returns the model output (same shape as ``x_t``)."""
        if self.family == "dit" and x_t.shape[-1] != x_t.shape[-2]:
            raise BadInputError(f"DiT needs square images (it unpatchifies a square grid); got {x_t.shape[-1]}x{x_t.shape[-2]} latents")
        t = self.timestep_input(t)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        # timestep by keyword: PixArt/SD3 take encoder_hidden_states second
        out = self.denoiser(x_t.to(self.dtype), timestep=t, **cond.kwargs, return_dict=False)[0]
        if out.shape[1] != x_t.shape[1]:  # learned-sigma models (DiT) predict [eps, var]
            out = out[:, : x_t.shape[1]]
        return out

    def dummy_conditioning(self, batch: int, image_size: tuple[int, int]) -> Conditioning:
        """Zero conditioning of the right shapes (used to probe layer shapes without a text encoder)."""
        if self.family in TEXT_FAMILIES:
            cfg = self.denoiser.config
            dim = {"sd3": "joint_attention_dim", "pixart": "caption_channels"}.get(self.family, "cross_attention_dim")
            ehs = torch.zeros(1, self.text_length, int(cfg[dim]), device=self.device, dtype=self.dtype)
            pdim = {"sdxl": lambda: int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim),
                    "sd3": lambda: int(cfg.pooled_projection_dim)}.get(self.family)
            pooled = None if pdim is None else torch.zeros(1, pdim(), device=self.device, dtype=self.dtype)
            return self.conditioning(batch=batch, prompt_embeds=ehs, pooled_prompt_embeds=pooled, image_size=image_size)
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


def _batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a batch-of-one tensor to ``batch`` rows (a view, no copy)."""
    return x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 and batch > 1 else x


def _place(m: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move to device; cast only if needed (diffusers warns on redundant casts)."""
    m = m.to(device)
    if next(m.parameters()).dtype != dtype:
        m = m.to(dtype)
    return m.eval().requires_grad_(False)


def _speed_up(denoiser: nn.Module) -> None:
    """Exact speed-ups on GPU: fused QKV projections and channels-last convolutions."""
    # diffusers' FusedJointAttnProcessor2_0 skips QK-norm and is also put on SD3.5's image-only
    # attention, which it cannot run: SD3.5 keeps its unfused (exact) processors
    sd35 = type(denoiser).__name__ == "SD3Transformer2DModel" and (
        denoiser.config.get("qk_norm") or denoiser.config.get("dual_attention_layers"))
    if hasattr(denoiser, "fuse_qkv_projections") and not sd35:
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
) -> DiffusionBackbone:
    """Load a diffusion backbone by preset name, local diffusers folder or hub id.

    ``use_t5=False`` never loads T5 text encoders (SD3: zeros for the T5 tokens, as
    diffusers with ``text_encoder_3=None``; PixArt: prompts must come as ``prompt_embeds``
    or from the prompt cache). ``prompt_cache`` is a folder where prompt embeddings are
    stored as safetensors, one file per (model, prompt), and read back instead of running
    the text encoders (not used with ``random_weights``).
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
    bb = DiffusionBackbone(source, comps, index, dt, dev, random_weights, name=preset.name if preset else name_or_path,
                           use_t5=use_t5, prompt_cache=prompt_cache)
    return bb


__all__ = ["DiffusionBackbone", "Conditioning", "allow_recompiles", "compile_denoiser", "load_backbone", "parse_dtype",
           "parse_device"]
