"""Weights: resolution order (data/weights -> local cache -> download), the one offline error,
identities, safe checkpoint loading, and the tag routes of every family. No network: the
download functions are replaced by recorders."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

from featcache.config import ParamError
from featcache.encoders import (TINY_DINOV2, TINY_OPENCLIP, load_encoder, register_tiny_models,
                                resolve_device, resolve_spec)
from featcache.encoders import weights as W
from featcache.encoders.weights import WeightsNotFoundError


class Downloads:
    """Replacement for the network: records calls, serves registered files or raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.files: dict[tuple[str, str], str] = {}

    def __call__(self, repo: str, filename: str):
        self.calls.append((repo, filename))
        if (repo, filename) in self.files:
            from pathlib import Path
            return Path(self.files[(repo, filename)])
        raise OSError(f"network disabled in tests ({repo}/{filename})")


@pytest.fixture
def downloads(tmp_path, monkeypatch) -> Downloads:
    """Isolated cwd and HF cache, online mode, recorded downloads."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for var in ("HF_HUB_OFFLINE", "FEATCACHE_WEIGHTS_DIR", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    rec = Downloads()
    monkeypatch.setattr(W, "hf_download", rec)
    monkeypatch.setattr(W, "url_download", lambda url: rec("url", url))
    return rec


def fake_hf_cache(root, repo: str, filename: str, data: bytes | None = None):
    """Lay out a file in huggingface_hub's cache format and return its path."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    path = folder / "snapshots" / ("0" * 40) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        path.write_bytes(data)
    return path


def test_looks_like_path(tmp_path):
    for tag in ("random", "pretrained", "openai", "facebook/dinov2-small", "webli"):
        assert not W.looks_like_path(tag)
    for path in ("ckpt.pt", "x/model.safetensors", "./folder", "/abs/dino", str(tmp_path)):
        assert W.looks_like_path(path)


def test_sha256_of_file_and_folder(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"weights")
    assert W.sha256_path(f) == "sha256:" + hashlib.sha256(b"weights").hexdigest()
    d = tmp_path / "folder"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"1")
    first = W.sha256_path(d)
    (d / "model.safetensors").write_bytes(b"2")
    assert W.sha256_path(d) != first and first.startswith("sha256:")


class NotATensor:
    pass


def test_checkpoints_load_without_unpickling(tmp_path):
    from safetensors.torch import save_file

    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        assert torch.equal(W.load_state_dict_file(tmp_path / name)["w"], sd["w"])
    torch.save({"w": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global|pickled code"):
        W.load_state_dict_file(tmp_path / "evil.pt")


def test_locate_order_and_the_one_error(tmp_path, monkeypatch, downloads):
    local = tmp_path / "data/weights/m.pt"
    cache = tmp_path / "cache.pt"
    cache.write_bytes(b"c")

    def locate(cached=lambda: None):
        return W.locate_weights("model X", [local], cached, lambda: downloads("r", "f"),
                                "Put m.pt in data/weights/.")

    assert locate(lambda: cache) == cache and downloads.calls == []
    local.parent.mkdir(parents=True)
    local.write_bytes(b"l")
    assert locate(lambda: cache) == local
    local.unlink()
    with pytest.raises(WeightsNotFoundError, match="download failed") as err:
        locate()
    assert downloads.calls == [("r", "f")]
    assert "model X" in str(err.value) and "data/weights/m.pt" in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE") as err:
        locate()
    assert downloads.calls == [("r", "f")]           # offline: no download attempted
    assert "Put m.pt in data/weights/." in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


@pytest.fixture
def tiny_tag(monkeypatch):
    """Give the tiny open_clip model an upstream tag 't1' hosted at HF repo featcache-test/tiny."""
    import open_clip
    from open_clip import pretrained

    register_tiny_models()
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_OPENCLIP,
                        {"t1": pretrained._pcfg(hf_hub="featcache-test/tiny/")})
    torch.manual_seed(42)
    return open_clip.create_model(TINY_OPENCLIP).eval()


def check_same_as(model, enc) -> None:
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert (enc(x).pooled - model.encode_image(x)).abs().max() <= 1e-5


def test_open_clip_tag_from_data_weights(tmp_path, downloads, tiny_tag):
    path = tmp_path / "data/weights" / TINY_OPENCLIP / "t1" / "open_clip_pytorch_model.bin"
    path.parent.mkdir(parents=True)
    torch.save(tiny_tag.state_dict(), path)
    for weights in ("pretrained", "t1"):
        enc = load_encoder(resolve_spec("open_clip", TINY_OPENCLIP, weights=weights, seed=9))
        assert enc.weights_id == "t1"
        check_same_as(tiny_tag, enc)
    assert downloads.calls == []


def test_open_clip_tag_from_hf_cache(tmp_path, downloads, tiny_tag):
    from safetensors.torch import save_file

    path = fake_hf_cache(tmp_path / "hub", "featcache-test/tiny", "open_clip_model.safetensors")
    save_file(tiny_tag.state_dict(), str(path))
    enc = load_encoder(resolve_spec("open_clip", TINY_OPENCLIP, weights="t1"))
    check_same_as(tiny_tag, enc)
    assert downloads.calls == []


def test_open_clip_tag_download_then_offline_error(tmp_path, monkeypatch, downloads, tiny_tag):
    spec = resolve_spec("open_clip", TINY_OPENCLIP, weights="t1")
    fetched = tmp_path / "fetched.bin"
    torch.save(tiny_tag.state_dict(), fetched)
    downloads.files[("featcache-test/tiny", "open_clip_pytorch_model.bin")] = str(fetched)
    check_same_as(tiny_tag, load_encoder(spec))
    assert downloads.calls == [("featcache-test/tiny", "open_clip_model.safetensors"),
                               ("featcache-test/tiny", "open_clip_pytorch_model.bin")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        load_encoder(spec)
    msg = str(err.value)
    assert f"data/weights/{TINY_OPENCLIP}/t1" in msg and "open_clip_pytorch_model.bin" in msg
    assert "weights: checkpoints/<file>" in msg and len(downloads.calls) == 2


def test_open_clip_tag_from_hub_mirror_in_data_weights(tmp_path, downloads, tiny_tag):
    """data/weights/<hf repo>/<file>, the layout the download stage writes."""
    from safetensors.torch import save_file

    path = tmp_path / "data/weights/featcache-test/tiny/open_clip_model.safetensors"
    path.parent.mkdir(parents=True)
    save_file(tiny_tag.state_dict(), str(path))
    check_same_as(tiny_tag, load_encoder(resolve_spec("open_clip", TINY_OPENCLIP, weights="t1")))
    assert downloads.calls == []


def test_openai_torchscript_archive_by_url_name(tmp_path, monkeypatch, downloads):
    """OpenAI's original .pt files are TorchScript archives (and need QuickGELU)."""
    import open_clip
    from open_clip import pretrained

    register_tiny_models()
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_OPENCLIP, {"oa": pretrained._pcfg(
        url="https://example.invalid/clip/tiny-oa.pt", quick_gelu=True)})
    torch.manual_seed(8)
    model = open_clip.create_model(TINY_OPENCLIP, force_quick_gelu=True).eval()
    (tmp_path / "data/weights").mkdir(parents=True)
    torch.jit.script(model).save(str(tmp_path / "data/weights/tiny-oa.pt"))
    assert W.is_torchscript_archive(tmp_path / "data/weights/tiny-oa.pt")
    enc = load_encoder(resolve_spec("open_clip", TINY_OPENCLIP, weights="pretrained"))
    assert enc.weights_id == "oa" and downloads.calls == []
    check_same_as(model, enc)


def test_dinov2_pretrained_from_data_weights(tmp_path, monkeypatch, downloads):
    from transformers import Dinov2Model

    from featcache.encoders.dinov2 import build_config

    torch.manual_seed(5)
    model = Dinov2Model(build_config(TINY_DINOV2)).eval()
    spec = resolve_spec("dinov2", TINY_DINOV2, weights="pretrained")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="config.json") as err:
        load_encoder(spec)
    assert f"data/weights/{TINY_DINOV2}" in str(err.value) and downloads.calls == []
    model.save_pretrained(tmp_path / "data/weights" / TINY_DINOV2)
    enc = load_encoder(spec)
    assert enc.weights_id == TINY_DINOV2
    x = torch.randn(1, 3, 112, 112)
    with torch.inference_mode():
        ref = model(pixel_values=x).last_hidden_state[:, 1:]
        got = enc(x).grid.flatten(2).transpose(1, 2)
    assert (got - ref).abs().max() <= 1e-5


def test_sam2_pretrained_from_data_weights(tmp_path, monkeypatch, downloads):
    from featcache.encoders.sam2 import build_image_encoder

    spec = resolve_spec("sam2", "sam2.1_hiera_t", weights="pretrained", image_size=64)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="sam2.1_hiera_tiny.pt") as err:
        load_encoder(spec)
    assert "data/weights" in str(err.value) and downloads.calls == []
    torch.manual_seed(3)
    ref = build_image_encoder("sam2.1_hiera_t", scalp=0).eval()
    sd = {f"image_encoder.{k}": v for k, v in ref.state_dict().items()}
    (tmp_path / "data/weights").mkdir(parents=True)
    torch.save({"model": sd}, tmp_path / "data/weights/sam2.1_hiera_tiny.pt")
    enc = load_encoder(spec)
    assert enc.weights_id == "sam2.1_hiera_tiny.pt"
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(enc(x).levels["P4_S16"], ref(x)["backbone_fpn"][2], atol=1e-5)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ParamError, match=r"^device: "):
        resolve_device("gpu")
    with pytest.raises(ParamError, match=r"^device: .*visible"):
        resolve_device(f"cuda:{torch.cuda.device_count() + 3}")


def test_fresh_process_light_import_and_tiny_models_by_name():
    """Importing the package loads no torch; tiny names resolve with no prior registration."""
    code = (
        "import sys, featcache.encoders as E\n"
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules\n"
        "enc = E.load_encoder(E.resolve_spec('open_clip', 'featcache-tiny-siglip', "
        "weights='random'))\n"
        "print(tuple(enc.spec.input_size), enc.spec.resize)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(160, 160) squash"
