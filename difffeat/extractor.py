"""The one extraction path: forward hooks on a diffusion denoiser.

:class:`FeatureExtractor` honours :class:`difffeat.protocol.Extractor` (keys, feature_info,
geometry, prepare, device, config); family specifics (layer names, token streams, compile
targets) come from the backbone's adapter (:mod:`difffeat.families`).

Protocol (DIFT, Tang et al. 2023, generalised): encode each image with the VAE **once**,
draw ``ensemble`` latents from its posterior (or use its mean), noise each to every
requested timestep, run the denoiser on all (image, timestep, ensemble) rows in large
batches, read the requested layers with forward hooks and average over the ensemble.

Deviations from the reference implementations, and why they are safe:

* **VAE once** (DIFT encodes the image repeated ``ensemble`` times and *samples* the
  posterior for every member, ``latent_dist.sample()`` in its ``src/models/dift_sd.py``):
  with ``latent="sample"`` (the ``dift`` preset) each member draws from N(mean, std) of
  the one posterior, the distribution DIFT samples, so the ensemble is *statistically
  equivalent*; ``latent="mean"`` (the API default) feeds the posterior mean to every
  member, a deviation from DIFT (small with SD's VAE, whose posterior std is tiny).
* **Early exit** after the deepest requested layer: the hook of that layer raises a
  private exception, so nothing after it runs. Layers before it are computed by the
  unchanged diffusers forward, so the features are *exactly* equal (tested).
* **Attention maps** (``attn.cross.LAYER`` / ``attn.self.LAYER``, see :mod:`difffeat.layers`)
  come from the same call: a capturing processor sits on the attention modules inside
  LAYER only (SDPA everywhere else), and LAYER's end is what early exit waits for.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from . import __version__
from .attention import AttentionCapture, parse_attention_name
from .backbone import DiffusionBackbone, allow_recompiles
from .conditioning import Conditioning
from .errors import BadInputError, OutOfMemoryError, one_of
from .freeu import FreeU
from .geometry import Geometry
from .io import image_key
from .adaln import discard, modulate
from .layers import as_map, block_level
from .protocol import dtype_name, portable_name
from .noise import draw

MOD = "#mod"  # captured (shift, scale) of an adaln layer, averaged over the ensemble like its features


class _StopForward(Exception):
    """Raised inside the deepest requested layer's hook to end the forward early."""


class FeatureExtractor(nn.Module):
    """Multi-layer, multi-timestep, ensemble-averaged diffusion features.

    Args:
        backbone: a loaded :class:`DiffusionBackbone`.
        layers: uniform layer names (``difffeat layers MODEL`` lists them).
        timesteps: integer timesteps in [0, num_train_timesteps).
        ensemble: noise draws averaged per (image, timestep).
        noise: ``random`` (per image, batch-independent), ``fixed`` (shared) or ``clean``.
        seed: global seed for the noise.
        latent: ``mean`` (posterior mean) or ``sample`` (a posterior draw per member, as DIFT).
        prompt: default prompt (``""`` = the empty prompt, as DIFT without a category).
        class_label: default class for class-conditional models (None = null class).
        resolution / resize: how PIL inputs are prepared (see :func:`difffeat.io.prepare_image`).
        max_batch: rows per denoiser call (image x timestep x ensemble rows are batched).
        compile: ``torch.compile`` the heavy sub-modules that carry no hook.
        early_exit: stop the forward after the deepest requested layer (exact).
        attention_heads: for ``attn.*`` outputs, ``mean`` over heads or keep ``all``.
        freeu: ``None``, a :data:`difffeat.freeu.PRESETS` name (``geoaware``) or
            :class:`~difffeat.freeu.FreeUSettings`: FreeU in the decoder (GeoAware-SC's features).
        adaln: DiTF's AdaLN-modulated features: ``block.k`` becomes block k's own AdaLN output on
            its input, after the ensemble mean (FLUX, SD3; see :mod:`difffeat.adaln`).
        discard_channels: DiTF's massive-activation channel discard (zeroed after the ensemble
            mean, before the AdaLN norm); recorded in :meth:`metadata`.
    """

    def __init__(
        self,
        backbone: DiffusionBackbone,
        layers: Sequence[str] | str,
        timesteps: Sequence[int] | int = (0,),
        ensemble: int = 1,
        noise: str = "random",
        seed: int = 0,
        latent: str = "mean",
        prompt: str = "",
        class_label: int | None = None,
        resolution: int | None = None,
        resize: str = "resize",
        max_batch: int = 16,
        compile: bool = False,
        early_exit: bool = True,
        attention_heads: str = "mean",
        freeu: Any = None,
        adaln: bool = False,
        discard_channels: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.timesteps = backbone.check_timesteps([timesteps] if isinstance(timesteps, int) else timesteps)
        if ensemble < 1:
            raise BadInputError(f"ensemble must be >= 1, got {ensemble}")
        if latent not in ("mean", "sample"):
            raise BadInputError(f"unknown latent mode {latent!r}; valid: mean, sample")
        self.ensemble, self.noise, self.seed, self.latent = int(ensemble), noise, int(seed), latent
        self.prompt, self.class_label = prompt, class_label
        self.resolution, self.resize, self.max_batch = resolution, resize, max(1, int(max_batch))
        self.early_exit, self.attention_heads, self.compiled = early_exit, attention_heads, bool(compile)
        self.freeu = FreeU(backbone.denoiser, freeu) if freeu else None
        self._freeu_name = freeu if isinstance(freeu, str) else (None if freeu is None else repr(freeu))
        # as create(freeu=...) takes it back: a preset name or the four factors
        self._freeu_spec = freeu if isinstance(freeu, str) or self.freeu is None else dataclasses.asdict(self.freeu.settings)
        self._modules_by_name = backbone.layer_modules()
        self._anchor: dict[str, str] = {}  # output name -> the layer whose end completes it
        for name in self.layers:
            parsed = parse_attention_name(name)
            layer = parsed[1] if parsed else name
            if layer not in self._modules_by_name:
                valid = block_level(list(self._modules_by_name))
                raise one_of("layer", layer, valid + ["attn.cross.LAYER", "attn.self.LAYER", "(sub-layers: see `difffeat layers MODEL`)"])
            self._anchor[name] = layer
        if not self.layers:
            raise BadInputError("no layers requested")
        self.adaln, self.discard_channels = bool(adaln), sorted(int(c) for c in discard_channels or ())
        self._adaln_eps = 1e-6  # the blocks' LayerNorm eps, read from the block in the hook
        if self.adaln:
            self._check_adaln()
        attn_names = [n for n in self.layers if parse_attention_name(n)]
        self._attention = AttentionCapture(self._modules_by_name, attn_names, attention_heads) if attn_names else None
        if compile:
            self.compile_denoiser()

    def _check_adaln(self) -> None:
        """adaln reads transformer blocks' inputs: only ``block.*`` names of an AdaLN family."""
        if not self.backbone.adapter.adaln:
            raise BadInputError(f"adaln (DiTF) needs an AdaLN-Zero transformer (FLUX, SD3); "
                                f"{self.backbone.name} is {self.backbone.family}")
        bad = [n for n in self.layers if not n.startswith("block.") or n.count(".") != 1]
        if bad:
            raise BadInputError(f"adaln (DiTF) applies to transformer blocks block.K only, not {bad[0]!r}")

    # ------------------------------------------------------------------ description
    @property
    def keys(self) -> list[str]:
        """Output keys: layer names, or ``layer@tT`` when several timesteps are asked."""
        if len(self.timesteps) == 1:
            return list(self.layers)
        return [f"{layer}@t{t}" for layer in self.layers for t in self.timesteps]

    def _key(self, layer: str, t: int) -> str:
        return layer if len(self.timesteps) == 1 else f"{layer}@t{t}"

    def probe(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Run order and (channels, stride) of every layer, probed once per backbone."""
        bb = self.backbone
        if self._attention is not None:  # attn.* names need a probe with capture (tiny, once per name set)
            probes = bb.__dict__.setdefault("_attention_probes", {})
            key = tuple(sorted(self._attention.modules))
            if key not in probes:
                probes[key] = probe_layers(bb, self._attention)
            return probes[key]
        if getattr(bb, "_layer_probe", None) is None:
            bb._layer_probe = probe_layers(bb)
        return bb._layer_probe

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One dict per output key: name, layer, t, channels, stride (input pixels per cell), kind.

        ``kind`` is ``feature`` ([B, C, h, w]), ``attn.cross`` ([B, h*w, n_tokens]; channels =
        n_tokens) or ``attn.self`` ([B, h*w, h*w]; channels None, it depends on the image size).
        """
        info = self.probe()
        out = []
        for layer in self.layers:
            _, (c, stride) = info[layer]
            parsed = parse_attention_name(layer)
            kind = f"attn.{parsed[0]}" if parsed else "feature"
            for t in self.timesteps:
                out.append({"name": self._key(layer, t), "layer": layer, "t": t,
                            "channels": None if kind == "attn.self" else c, "stride": stride, "kind": kind})
        return out

    def metadata(self) -> dict[str, Any]:
        """What produced these features (written into every output file)."""
        return {
            "model": self.backbone.name, "source": self.backbone.source, "layers": self.layers,
            "timesteps": self.timesteps, "ensemble": self.ensemble, "noise": self.noise, "seed": self.seed,
            "latent": self.latent, "prompt": self.prompt, "dtype": str(self.backbone.dtype).replace("torch.", ""),
            "resolution": self.resolution, "resize": self.resize, "difffeat_version": __version__,
            **({"freeu": self._freeu_name} if self.freeu else {}),
            "adaln": self.adaln, "discard_channels": list(self.discard_channels),
            "denoiser_weights": self.backbone.denoiser_weights, "time_shift": self.backbone.adapter.time_shift,
        }

    @property
    def config(self) -> dict[str, Any]:
        """Keyword arguments of :func:`difffeat.create` that rebuild this extractor (same features)."""
        bb = self.backbone
        return {"name": portable_name(bb.name), "layers": list(self.layers), "timesteps": list(self.timesteps),
                "ensemble": self.ensemble, "noise": self.noise, "seed": self.seed, "latent": self.latent,
                "prompt": self.prompt, "class_label": self.class_label, "resolution": self.resolution,
                "resize": self.resize, "dtype": dtype_name(bb.dtype), "device": str(bb.device),
                "max_batch": self.max_batch, "compile": self.compiled, "early_exit": self.early_exit,
                "attention_heads": self.attention_heads, "use_t5": bb.use_t5, "random_weights": bb._random,
                "prompt_cache": bb.prompt_cache_dir, "freeu": self._freeu_spec,
                **self._optional_config()}

    def _optional_config(self) -> dict[str, Any]:
        """Settings recorded only when used, so configs (and checkpoints) of plain extractors keep
        the keys they always had."""
        opt = {"adaln": self.adaln or None, "discard_channels": list(self.discard_channels) or None,
               "denoiser_weights": self.backbone.denoiser_weights, "time_shift": self.backbone.adapter.time_shift or None}
        return {k: v for k, v in opt.items() if v is not None}

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def per_image(self) -> bool:
        """Features of an image never depend on the other images of the call."""
        return True

    # ------------------------------------------------------------------ inputs
    @property
    def geometry(self) -> Geometry:
        """How inputs are prepared: this extractor's resolution and resize policy, the backbone's multiple."""
        return Geometry(self.resolution, self.resize, self.backbone.size_multiple)

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> [B,3,H,W] in [0,1] using this extractor's geometry."""
        return self.geometry.prepare(images)

    def _as_batch(self, images: Any) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
            return self.prepare(images)
        if isinstance(images, (list, tuple)):
            images = torch.stack(list(images))
        if not isinstance(images, torch.Tensor):
            raise BadInputError(f"images must be a tensor [B,3,H,W] in [0,1] or PIL images, got {type(images).__name__}")
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise BadInputError(f"images must have shape [B,3,H,W], got {list(images.shape)}")
        m = self.backbone.size_multiple
        if images.shape[-1] % m or images.shape[-2] % m:
            raise BadInputError(f"image size {images.shape[-1]}x{images.shape[-2]} is not a multiple of {m} for {self.backbone.name}")
        return images

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(
        self,
        images: Any,
        prompts: Sequence[str] | str | None = None,
        class_labels: Sequence[int] | int | None = None,
        keys: Sequence[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Features {key: Tensor[B, C, h, w] (float32, on the backbone's device)}.

        ``attn.*`` keys hold attention maps ([B, h*w, N], see :mod:`difffeat.layers`).
        """
        bb = self.backbone
        x = self._as_batch(images)
        B, H, W = x.shape[0], x.shape[-2], x.shape[-1]
        T, E = len(self.timesteps), self.ensemble
        if keys is None:
            keys = [image_key(img) for img in x] if self.noise == "random" else ["-"] * B
        elif len(keys) != B:
            raise BadInputError(f"got {len(keys)} keys for {B} images")
        cond = bb.conditioning(
            prompts=self.prompt if prompts is None else prompts,
            class_labels=self.class_label if class_labels is None else class_labels,
            batch=B, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, image_size=(H, W),
            prompt_attention_mask=prompt_attention_mask,
        )
        try:
            return self._run(x, cond, list(keys))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise OutOfMemoryError(
                f"CUDA out of memory with {B} images x {T} timesteps x {E} ensemble at {W}x{H} "
                f"(max_batch={self.max_batch}); lower the batch size, --max-batch or the ensemble"
            ) from None

    def _run(self, x: torch.Tensor, cond: Conditioning, keys: list[str]) -> dict[str, torch.Tensor]:
        bb = self.backbone
        B, T, E = x.shape[0], len(self.timesteps), self.ensemble
        mean, std = bb.encode(x)  # the VAE runs once per image
        shape = tuple(mean.shape[1:])
        latent_eps, noise = draw(self.noise, keys, self.seed, shape, E, T, self.latent == "sample")
        x0 = mean.unsqueeze(1).expand(B, E, *shape).float()
        if latent_eps is not None:
            x0 = x0 + std.unsqueeze(1).float() * latent_eps.to(x0.device)
        # rows ordered (image, timestep, member)
        x0_rows = x0.unsqueeze(1).expand(B, T, E, *shape).reshape(B * T * E, *shape)
        t_rows = torch.tensor(self.timesteps, device=bb.device).view(1, T, 1).expand(B, T, E).reshape(-1)
        if noise is None:
            xt_rows = x0_rows.to(bb.dtype)
        else:
            xt_rows = bb.add_noise(x0_rows, noise.to(bb.device).reshape(B * T * E, *shape), t_rows).to(bb.dtype)
        cond_rows = cond.repeat_interleave(T * E)
        img_of_row = torch.arange(B, device=bb.device).repeat_interleave(T * E)
        tix_of_row = torch.arange(T, device=bb.device).repeat_interleave(E).repeat(B)

        sums: dict[str, torch.Tensor] = {}
        n = B * T * E
        for r0 in range(0, n, self.max_batch):
            r1 = min(n, r0 + self.max_batch)
            feats = self.run_denoiser(xt_rows[r0:r1], t_rows[r0:r1], cond_rows.select(slice(r0, r1)))
            for layer, f in feats.items():
                f = f.float()
                for ti, t in enumerate(self.timesteps):
                    sel = tix_of_row[r0:r1] == ti
                    if not bool(sel.any()):
                        continue
                    key = self._key(layer, t)
                    if key not in sums:
                        sums[key] = torch.zeros((B, *f.shape[1:]), device=f.device, dtype=torch.float32)
                    sums[key].index_add_(0, img_of_row[r0:r1][sel], f[sel])
        return self._finish({k: v / E for k, v in sums.items()})

    def _finish(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Ensemble means -> outputs: DiTF's channel discard and AdaLN modulation when asked."""
        out = {}
        for layer in self.layers:
            for t in self.timesteps:
                key = self._key(layer, t)
                if self.adaln:
                    shift, scale = means[self._key(layer + MOD, t)].chunk(2, dim=1)
                    out[key] = modulate(means[key], shift, scale, self._adaln_eps, self.discard_channels)
                else:
                    out[key] = discard(means[key], self.discard_channels)
        return out

    def run_denoiser(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> dict[str, torch.Tensor]:
        """One hooked denoiser call on noisy inputs; returns the raw (non-averaged) layer maps."""
        captured: dict[str, torch.Tensor] = {}
        order = self.probe()
        anchors = sorted(set(self._anchor.values()))
        last = max(anchors, key=lambda n: order[n][0]) if self.early_exit else None
        wanted = {n for n in self.layers if n in self._modules_by_name}  # feature outputs
        hw = (x_t.shape[-2], x_t.shape[-1])
        feature_map = self.backbone.adapter.feature_map

        def make_hook(name: str):  # type: ignore[no-untyped-def]
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if name in wanted:
                    captured[name] = feature_map(name, module, output, hw)
                if name == last:
                    raise _StopForward

            return hook

        if self.adaln:
            handles = [self._modules_by_name[n].register_forward_pre_hook(self._adaln_hook(n, captured, hw, last),
                                                                          with_kwargs=True) for n in anchors]
        else:
            handles = [self._modules_by_name[n].register_forward_hook(make_hook(n)) for n in anchors]
        attention = self._attention.capture() if self._attention else contextlib.nullcontext({})
        freeu = self.freeu.active() if self.freeu else contextlib.nullcontext()
        try:
            with attention as sinks, freeu:
                try:
                    self.backbone.predict(x_t, t, cond)
                except _StopForward:
                    pass
                captured.update({name: sink.result() for name, sink in sinks.items()})
        finally:
            for h in handles:
                h.remove()
        return self.freeu.scale_stored(captured) if self.freeu else captured

    def _adaln_hook(self, name: str, captured: dict[str, torch.Tensor], hw: tuple[int, int], last: str | None):  # type: ignore[no-untyped-def]
        """Pre-hook of block ``name``: its input (as a map) and its (shift, scale); the deepest one
        ends the forward before its block runs (nothing of it is needed)."""
        adapter = self.backbone.adapter

        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            x, shift, scale, self._adaln_eps = adapter.adaln_input(module, kwargs)
            captured[name] = as_map(x, hw, adapter.patch)
            captured[name + MOD] = torch.cat([shift, scale], dim=1)
            if name == last:
                raise _StopForward

        return hook

    # ------------------------------------------------------------------ speed
    def compile_denoiser(self) -> None:
        """``torch.compile`` every transformer/resnet sub-module that carries no hook.

        The UNet's own forward is left eager (FX/dynamo tracing of the whole UNet with
        hooks and early exit is fragile); the compiled sub-modules hold almost all FLOPs.
        """
        allow_recompiles()  # one graph per block shape (the default 8 leaves most resnets eager)
        hooked = {id(self._modules_by_name[n]) for n in self._anchor.values()}
        hooked |= {id(r) for r, *_ in self.freeu.plan} if self.freeu else set()  # per-call FreeU pre-hooks
        captured = self._attention.contains() if self._attention else set()
        for m in self.backbone.denoiser.modules():
            if type(m).__name__ in self.backbone.adapter.compile_targets and id(m) not in hooked:
                if captured and any(id(sub) in captured for sub in m.modules()):
                    continue  # its attention processor is swapped per call
                m.compile(dynamic=False)


@torch.no_grad()
def probe_layers(bb: DiffusionBackbone, attention: AttentionCapture | None = None) -> dict[str, tuple[int, tuple[int, int]]]:
    """{layer: (run order, (channels, stride))} from one small dummy forward with all hooks.

    With ``attention``, its ``attn.*`` names are added too: the run order of their LAYER,
    channels = number of keys (text tokens for cross), stride of the query grid.
    """
    mods = bb.layer_modules()
    patch, feature_map = bb.patch_size, bb.adapter.feature_map
    # UNets: the smallest size every block accepts; transformers: a 4x4 token grid
    # (DiT/PixArt recompute their sin-cos grid, SD3 crops its table: any size works)
    side = 2 * bb.latent_multiple if hasattr(bb.denoiser, "down_blocks") else 4 * patch
    hw = (side, side)
    seen: dict[str, tuple[int, tuple[int, int]]] = {}

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            f = feature_map(name, module, output, hw)
            stride = bb.latent_scale * side // f.shape[-1]
            seen[name] = (len(seen), (int(f.shape[1]), int(stride)))

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in mods.items()]
    try:
        x = torch.zeros(1, bb.in_channels, *hw, device=bb.device, dtype=bb.dtype)
        with attention.capture() if attention else contextlib.nullcontext({}) as sinks:
            bb.predict(x, torch.tensor([1], device=bb.device), bb.dummy_conditioning(1, (side * bb.latent_scale,) * 2))
    finally:
        for h in handles:
            h.remove()
    for name, sink in sinks.items():
        a = sink.result()
        layer = name.split(".", 2)[2]
        q_side = round(a.shape[-2] ** 0.5)
        seen[name] = (seen[layer][0], (int(a.shape[-1]), int(bb.latent_scale * side // q_side)))
    return seen
