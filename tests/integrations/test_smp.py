"""segmentation-models-pytorch plug-in: registry, encoder contract, weights, every decoder.

The ``TestEncoderSuite`` / ``TestModelSuite`` checks reproduce, for our encoder names, the checks of
smp's own ``tests/encoders/base.py`` (``BaseEncoderTester``) and ``tests/models/base.py``
(``BaseModelTester``) from github.com/qubvel-org/segmentation_models.pytorch (MIT); smp's test
package is not installed, so the checks are re-stated here.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch
from torch import nn

smp = pytest.importorskip("segmentation_models_pytorch")
plugin = importlib.import_module("effbackbone.integrations.smp")

from smp_support import (  # noqa: E402
    SIZE,
    block_network,
    timm_checkpoint,
    timm_features,
    torchvision_checkpoint,
)

from effbackbone import create_model  # noqa: E402
from effbackbone.layers import adapt_stem_weight  # noqa: E402

EXPECTED = (
    [f"effbackbone-b{i}" for i in range(8)]
    + [f"effbackbone-lite{i}" for i in range(5)]
    + [
        "effbackbone-v2-s",
        "effbackbone-v2-m",
        "effbackbone-v2-l",
    ]
)
B0 = "effbackbone-b0"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test here runs without network and with empty weight caches."""
    return block_network(monkeypatch, tmp_path)


def sample(channels: int = 3, batch: int = 1, size: int = SIZE) -> torch.Tensor:
    return torch.rand(batch, channels, size, size)


def strides(x: torch.Tensor, features: list[torch.Tensor]) -> list[int]:
    return [x.shape[-1] // f.shape[-1] for f in features]


# -- registry ----------------------------------------------------------------------------------------
def test_import_registers_every_variant_idempotently() -> None:
    before = smp.encoders.get_encoder_names()
    assert set(EXPECTED) <= set(before)
    importlib.reload(plugin)
    importlib.import_module("effbackbone.integrations.smp")
    assert plugin.register() == EXPECTED
    assert smp.encoders.get_encoder_names() == before
    assert all(smp.encoders.encoders[n]["encoder"] is plugin.EffBackboneEncoder for n in EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_every_variant_out_channels_match_forward(name: str) -> None:
    # Meta device: shapes only, so the eight big variants cost nothing.
    with torch.device("meta"):
        encoder = smp.encoders.get_encoder(name)
        features = encoder(torch.empty(1, 3, SIZE, SIZE))
    assert [f.shape[1] for f in features] == encoder.out_channels
    assert strides(features[0], features) == [1, 2, 4, 8, 16, 32]
    variant = name.removeprefix("effbackbone-").replace("-", "_")
    with torch.device("meta"):
        assert encoder.out_channels[1:] == create_model(variant).feature_channels


def test_register_custom_phi_builds_scaled_encoder() -> None:
    name = plugin.register_custom("effbackbone-phi2.5", "b0", phi=2.5)
    assert plugin.register_custom(name, "b0", phi=2.5) == name  # re-registering is fine
    with torch.device("meta"):
        expected = create_model("b0", phi=2.5)
        model = smp.Unet(name, encoder_weights=None, classes=2, in_channels=4)
        assert model(torch.empty(1, 4, SIZE, SIZE)).shape == (1, 2, SIZE, SIZE)
    assert model.encoder.out_channels == [4, *expected.feature_channels]
    assert sum(len(s) for s in model.encoder.model.blocks) == sum(len(s) for s in expected.blocks) > 16
    assert expected.feature_channels != create_model("b0").feature_channels


def test_register_custom_training_options_reach_the_encoder() -> None:
    name = plugin.register_custom(
        "effbackbone-b0-train", "b0", drop_path_rate=0.1, grad_checkpointing=True, frozen_stages=1
    )
    model = smp.Unet(name, encoder_weights=None, classes=3)
    encoder = model.encoder.model
    assert encoder.grad_checkpointing and encoder.cfg.drop_path_rate == 0.1
    assert not encoder.conv_stem.weight.requires_grad and encoder.blocks[-1][0].conv_pwl.weight.requires_grad
    model.train()
    assert not encoder.bn1.training  # frozen stages stay in eval mode under smp's train()
    x = sample(batch=2)
    nn.functional.cross_entropy(model(x), torch.randint(0, 3, (2, SIZE, SIZE))).backward()
    assert encoder.blocks[-1][0].conv_pwl.weight.grad is not None and encoder.conv_stem.weight.grad is None


def test_register_custom_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="another library"):
        plugin.register_custom("resnet18", "b0")
    with pytest.raises(TypeError, match="unknown option"):
        plugin.register_custom("effbackbone-bad", "b0", phy=2.0)
    with pytest.raises(TypeError, match="set by smp"):
        plugin.register_custom("effbackbone-bad", "b0", in_channels=4)
    with pytest.raises(FileNotFoundError):
        plugin.register_custom("effbackbone-bad", "b0", weights="/no/such/file.safetensors")
    assert "effbackbone-bad" not in smp.encoders.encoders


# -- smp BaseEncoderTester checks ---------------------------------------------------------------------
class TestEncoderSuite:
    """smp ``BaseEncoderTester`` checks for b0 (MBConv), lite0 (no SE, ReLU6) and v2-s (FusedMBConv)."""

    names = (B0, "effbackbone-lite0", pytest.param("effbackbone-v2-s", marks=pytest.mark.slow))

    @pytest.mark.parametrize("name", names)
    def test_forward_backward(self, name: str) -> None:
        encoder = smp.encoders.get_encoder(name, in_channels=3, encoder_weights=None)
        features = encoder(sample())
        assert len(features) == 6
        features[-1].mean().backward()
        assert all(p.grad is not None for p in encoder.parameters())

    @pytest.mark.parametrize("in_channels", [1, 3, 4])
    def test_in_channels(self, in_channels: int) -> None:
        encoder = smp.encoders.get_encoder(B0, in_channels=in_channels, encoder_weights=None).eval()
        with torch.inference_mode():
            features = encoder(sample(in_channels))
        assert encoder.out_channels[0] == in_channels == features[0].shape[1]
        assert encoder.model.conv_stem.weight.shape[1] == in_channels

    @pytest.mark.parametrize(
        "name",
        [
            B0,
            pytest.param("effbackbone-lite0", marks=pytest.mark.slow),
            pytest.param("effbackbone-v2-s", marks=pytest.mark.slow),
        ],
    )
    @pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
    def test_depth(self, name: str, depth: int) -> None:
        encoder = smp.encoders.get_encoder(name, encoder_weights=None, depth=depth).eval()
        x = sample()
        with torch.inference_mode():
            features = encoder(x)
        assert len(features) == len(encoder.out_channels) == depth + 1
        assert strides(x, features) == [1, 2, 4, 8, 16, 32][: depth + 1]
        assert encoder.output_stride == 2**depth
        assert [f.shape[1] for f in features] == encoder.out_channels

    @pytest.mark.parametrize("depth", [0, 6])
    def test_invalid_depth(self, depth: int) -> None:
        with pytest.raises(ValueError, match="depth"):
            smp.encoders.get_encoder(B0, depth=depth)

    @pytest.mark.parametrize("name", names)
    @pytest.mark.parametrize("stride", [8, 16])
    def test_dilated(self, name: str, stride: int) -> None:
        encoder = smp.encoders.get_encoder(name, encoder_weights=None, output_stride=stride).eval()
        x = sample()
        with torch.inference_mode():
            features = encoder(x)
        assert strides(x, features) == [min(stride, s) for s in (1, 2, 4, 8, 16, 32)]
        assert encoder.output_stride == stride

    def test_invalid_output_stride(self) -> None:
        with pytest.raises(ValueError, match="output_stride"):
            smp.encoders.get_encoder(B0, output_stride=4)
        encoder = smp.encoders.get_encoder(B0, output_stride=8)
        with pytest.raises(ValueError, match="already dilated"):
            encoder.make_dilated(16)
        with pytest.raises(ValueError, match="16 or 8"):
            encoder.make_dilated(32)

    def test_torch_script(self) -> None:
        encoder = smp.encoders.get_encoder(B0, encoder_weights=None).eval()
        assert encoder._is_torch_scriptable
        scripted = torch.jit.script(encoder)
        x = sample()
        with torch.inference_mode():
            for eager, script in zip(encoder(x), scripted(x), strict=True):
                torch.testing.assert_close(eager, script)

    def test_torch_export(self) -> None:
        encoder = smp.encoders.get_encoder(B0, encoder_weights=None).eval()
        assert encoder._is_torch_exportable
        x = sample()
        exported = torch.export.export(encoder, args=(x,), strict=True)
        with torch.inference_mode():
            for eager, export in zip(encoder(x), exported.module()(x), strict=True):
                torch.testing.assert_close(eager, export)

    @pytest.mark.slow
    def test_compile(self) -> None:
        encoder = smp.encoders.get_encoder(B0, encoder_weights=None).eval()
        assert encoder._is_torch_compilable
        torch.compiler.reset()
        compiled = torch.compile(encoder, fullgraph=True, dynamic=True, backend="eager")
        x = sample()
        with torch.inference_mode():
            for eager, comp in zip(encoder(x), compiled(x), strict=True):
                torch.testing.assert_close(eager, comp)


# -- dilation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [8, 16])
def test_make_dilated_equals_native_dilation_and_timm(tmp_path: Path, stride: int) -> None:
    path, classifier = timm_checkpoint(tmp_path)
    native = smp.encoders.get_encoder(B0, weights=str(path), output_stride=stride).eval()
    patched = smp.encoders.get_encoder(B0, weights=str(path)).eval()
    patched.make_dilated(stride)
    assert patched.output_stride == native.output_stride == stride
    assert [s.stride for s in patched.model.feature_specs] == [s.stride for s in native.model.feature_specs]
    x = sample()
    with torch.no_grad():
        ours = native(x)
        for a, b in zip(ours, patched(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The same tensors as timm's own dilated features_only model.
    for a, b in zip(ours[1:], timm_features("efficientnet_b0", classifier, x, output_stride=stride), strict=True):
        torch.testing.assert_close(a, b)


def test_tf_compat_same_padding_dilates_like_timm(tmp_path: Path) -> None:
    name = plugin.register_custom("effbackbone-tf-b0", "b0", tf_compat=True)
    path, classifier = timm_checkpoint(tmp_path, "tf_efficientnet_b0")
    native = smp.encoders.get_encoder(name, weights=str(path), output_stride=16).eval()
    patched = smp.encoders.get_encoder(name, weights=str(path)).eval()
    patched.make_dilated(16)
    x = torch.rand(1, 3, 72, 72)  # TF "same" padding is asymmetric at this size
    with torch.no_grad():
        ours = native(x)
        for a, b in zip(ours, patched(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(ours[1:], timm_features("tf_efficientnet_b0", classifier, x, output_stride=16), strict=True):
        torch.testing.assert_close(a, b)
    assert smp.encoders.get_preprocessing_params(name, str(path))["mean"] == [0.485, 0.456, 0.406]


def test_get_stages_covers_the_stride_16_and_32_blocks() -> None:
    encoder = smp.encoders.get_encoder(B0)
    stages = encoder.get_stages()
    specs = encoder.model.all_feature_specs
    assert set(stages) == {16, 32}
    last = {s.name: s.stage for s in specs}
    assert stages[32][0][-1] is encoder.model.blocks[last["C5"]]
    assert stages[16][0][-1] is encoder.model.blocks[last["C4"]]
    assert stages[16][0][0] is encoder.model.blocks[last["C3"] + 1]


# -- weights (offline, local files) -----------------------------------------------------------------------
def test_encoder_weights_path_timm_layout_equals_timm_and_create_model(tmp_path: Path, offline: Path) -> None:
    path, classifier = timm_checkpoint(tmp_path / "ckpt")
    encoder = smp.encoders.get_encoder(B0, weights=str(path)).eval()
    reference = create_model("b0", weights=path).eval()
    x = sample()
    with torch.no_grad():
        ours = encoder(x)
        ref = reference(x)
    assert torch.equal(ours[0], x)
    for a, b in zip(ours[1:], ref.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(ours[1:], timm_features("efficientnet_b0", classifier, x), strict=True):
        torch.testing.assert_close(a, b)
    # The checkpoint was linked into the (temporary) Hugging Face cache, not copied from the network.
    staged = list(offline.glob("models--effbackbone-local--weights/snapshots/*/model.safetensors"))
    assert len(staged) == 1 and staged[0].resolve() == path.resolve()


def test_encoder_weights_path_torchvision_pth_through_unet(tmp_path: Path) -> None:
    path = torchvision_checkpoint(tmp_path)
    model = smp.Unet(B0, encoder_weights=str(path)).eval()
    reference = create_model("b0", weights=path).eval()
    x = sample()
    with torch.no_grad():
        for a, b in zip(model.encoder(x)[1:], reference(x).values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_imagenet_from_weights_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = timm_checkpoint(tmp_path / "weights", filename="b0.safetensors")
    monkeypatch.setenv(plugin.WEIGHTS_DIR_ENV, str(path.parent))
    # smp's default ("imagenet") resolves to the random local file above (sockets are blocked).
    model = smp.create_model("fpn", B0)
    reference = create_model("b0", weights=path)
    torch.testing.assert_close(model.encoder.model.conv_stem.weight, reference.conv_stem.weight, rtol=0, atol=0)
    as_true = smp.encoders.get_encoder(B0, weights=True)  # timm-style True means "imagenet" too
    torch.testing.assert_close(as_true.model.blocks[-1][0].conv_pwl.weight, reference.blocks[-1][0].conv_pwl.weight)
    assert smp.encoders.get_preprocessing_params(B0)["std"] == [0.229, 0.224, 0.225]


def test_imagenet_missing_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="EFFBACKBONE_WEIGHTS_DIR.*encoder_weights=None"):
        smp.Unet(B0)
    with pytest.raises(FileNotFoundError, match="not found"):
        smp.Unet(B0, encoder_weights="/no/such/b0.safetensors")
    with pytest.raises(KeyError, match="Wrong pretrained weights"):
        smp.Unet(B0, encoder_weights="advprop")


def test_find_imagenet_weights_looks_in_the_imagenet_sources_cache(tmp_path: Path, offline: Path) -> None:
    assert plugin.find_imagenet_weights(B0, "b0") is None
    repo = offline / "models--timm--efficientnet_b0.ra_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "model.safetensors").touch()
    assert plugin.find_imagenet_weights(B0, "b0") == repo / "snapshots" / "abc" / "model.safetensors"
    # torchvision's cached file is the "torchvision" source's, not "imagenet"'s: the same name always means
    # the same weights (timm's efficientnet_b1.ft_in1k here), wherever they were found.
    checkpoints = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "efficientnet_b1-c27df63c.pth").touch()
    assert plugin.find_imagenet_weights("effbackbone-b1", "b1") is None


def test_pretrained_in_channels_adapt_the_stem(tmp_path: Path) -> None:
    path, _ = timm_checkpoint(tmp_path)
    rgb = smp.encoders.get_encoder(B0, weights=str(path)).eval()
    gray = smp.encoders.get_encoder(B0, in_channels=1, weights=str(path)).eval()
    four = smp.encoders.get_encoder(B0, in_channels=4, weights=str(path))
    expected = adapt_stem_weight(rgb.model.conv_stem.weight.detach(), 4)
    torch.testing.assert_close(four.model.conv_stem.weight.detach(), expected, rtol=0, atol=0)
    # "repeat" sums R, G, B for one channel: a gray image gives what the RGB model gives for it.
    x = sample(1)
    with torch.no_grad():
        for a, b in zip(gray(x)[1:], rgb(x.expand(-1, 3, -1, -1))[1:], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_depth_3_loads_full_checkpoint_and_has_no_unused_stage(tmp_path: Path) -> None:
    path = torchvision_checkpoint(tmp_path)
    encoder = smp.encoders.get_encoder(B0, depth=3, weights=str(path)).eval()
    full = create_model("b0", weights=path).eval()
    assert len(encoder.model.blocks) < len(full.blocks)
    x = sample()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x)[-1], full(x)["C3"], rtol=0, atol=0)


def test_load_state_dict_rejects_a_wrong_variant(tmp_path: Path) -> None:
    path, _ = timm_checkpoint(tmp_path, "efficientnet_b1")
    with pytest.raises(ValueError, match="do not fit"):
        smp.encoders.get_encoder(B0, weights=str(path))


# -- every decoder: build, one training step, eval ---------------------------------------------------------
DECODERS = [
    ("Unet", {}, SIZE),
    ("UnetPlusPlus", {}, SIZE),
    ("FPN", {}, SIZE),
    ("PSPNet", {}, SIZE),
    ("Linknet", {}, SIZE),
    ("PAN", {}, 2 * SIZE),  # PAN's pyramid pooling halves 1/16 three times
    ("MAnet", {}, SIZE),
    ("DeepLabV3", {"encoder_output_stride": 8}, SIZE),
    ("DeepLabV3", {"encoder_output_stride": 16}, SIZE),
    ("DeepLabV3Plus", {"encoder_output_stride": 8}, SIZE),
    ("DeepLabV3Plus", {"encoder_output_stride": 16}, SIZE),
    ("UPerNet", {}, SIZE),
    ("Segformer", {}, SIZE),
]


def train_step_then_eval(model: nn.Module, size: int, classes: int = 3, out_size: int | None = None) -> torch.Tensor:
    out_size = out_size or size
    x, y = sample(batch=2, size=size), torch.randint(0, classes, (2, out_size, out_size))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stem_before = model.encoder.model.conv_stem.weight.detach().clone()
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    no_grad = [n for n, p in model.encoder.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    assert not no_grad, f"encoder parameters without a finite gradient: {no_grad[:5]}"
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(stem_before, model.encoder.model.conv_stem.weight)
    model.eval()
    with torch.inference_mode():
        out = model(x)
    assert out.shape == (2, classes, out_size, out_size) and out.isfinite().all()
    return out


@pytest.mark.parametrize(("arch", "kwargs", "size"), DECODERS, ids=lambda v: str(v) if v else "")
def test_decoder_trains_and_evaluates(arch: str, kwargs: dict[str, int], size: int) -> None:
    model = getattr(smp, arch)(B0, encoder_weights=None, classes=3, **kwargs)
    train_step_then_eval(model, size)
    if "encoder_output_stride" in kwargs:
        assert model.encoder.output_stride == kwargs["encoder_output_stride"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus", "FPN", "Linknet", "MAnet", "DeepLabV3", "DeepLabV3Plus"])
@pytest.mark.parametrize("depth", [3, 4])
def test_decoder_encoder_depth(arch: str, depth: int) -> None:
    kwargs = {"decoder_channels": (256, 128, 64, 32, 16)[:depth]} if arch in ("Unet", "UnetPlusPlus", "MAnet") else {}
    model = getattr(smp, arch)(B0, encoder_weights=None, classes=3, encoder_depth=depth, **kwargs)
    # smp's FPN upsamples as if depth were 5 with any encoder: expect what its own resnet18 gives.
    with torch.device("meta"):
        reference = getattr(smp, arch)("resnet18", encoder_weights=None, classes=3, encoder_depth=depth, **kwargs)
        out_size = reference.eval()(torch.empty(1, 3, SIZE, SIZE)).shape[-1]
    train_step_then_eval(model, SIZE, out_size=out_size)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in EXPECTED if n != B0])
def test_every_variant_in_unet(name: str) -> None:
    train_step_then_eval(smp.Unet(name, encoder_weights=None, classes=3), SIZE)


# -- smp BaseModelTester checks (Unet by default, every architecture with -m slow) ---------------------------
@pytest.fixture
def imagenet_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Random b0 weights in a local folder, where smp's default ``"imagenet"`` weights are found offline."""
    path, _ = timm_checkpoint(tmp_path / "imagenet", filename="b0.safetensors")
    monkeypatch.setenv(plugin.WEIGHTS_DIR_ENV, str(path.parent))
    return path.parent


ARCHS = [
    "unet",
    "unetplusplus",
    "manet",
    "linknet",
    "fpn",
    "pspnet",
    "deeplabv3",
    "deeplabv3plus",
    "pan",
    "upernet",
    "segformer",
]
MODEL_ARCHS = [a if a == "unet" else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]


@pytest.mark.usefixtures("imagenet_dir")
@pytest.mark.parametrize("arch", MODEL_ARCHS)
class TestModelSuite:
    """smp ``BaseModelTester`` checks with ``encoder_name="effbackbone-b0"``."""

    def size(self, arch: str) -> int:
        return 2 * SIZE if arch == "pan" else SIZE

    def batch(self, arch: str) -> int:
        # As smp's own subclasses: pooling branches need > 1 value per channel in train mode.
        return 2 if arch in ("deeplabv3", "deeplabv3plus", "pan", "pspnet", "upernet") else 1

    def test_forward_backward(self, arch: str) -> None:
        model = smp.create_model(arch, B0)
        output = model(sample(batch=self.batch(arch), size=self.size(arch)))
        assert output.shape[1] == 1
        output.mean().backward()

    def test_in_channels_and_depth_and_out_classes(self, arch: str) -> None:
        kwargs = {"decoder_channels": (256, 128, 64)} if arch in ("unet", "unetplusplus", "manet") else {}
        model = smp.create_model(arch, B0, encoder_depth=3, in_channels=1, classes=7, **kwargs).eval()
        with torch.inference_mode():
            assert model(sample(1, self.batch(arch), self.size(arch))).shape[1] == 7

    def test_classification_head(self, arch: str) -> None:
        aux = {"pooling": "avg", "classes": 10, "dropout": 0.5, "activation": "sigmoid"}
        model = smp.create_model(arch, B0, aux_params=aux).eval()
        with torch.inference_mode():
            _, labels = model(sample(batch=self.batch(arch), size=self.size(arch)))
        assert labels.shape == (self.batch(arch), 10) and ((labels >= 0) & (labels <= 1)).all()

    def test_any_resolution(self, arch: str) -> None:
        model = smp.create_model(arch, B0).eval()
        x = torch.rand(1, 3, self.size(arch) + 3, self.size(arch) + 7)
        if model.requires_divisible_input_shape:
            with pytest.raises(RuntimeError, match="Wrong input shape"):
                model(x)
            return
        with torch.inference_mode():
            assert model(x).shape[2:] == x.shape[2:]

    def test_save_load_with_hub_mixin(self, arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        model = smp.create_model(arch, B0).eval()
        model.save_pretrained(tmp_path / "saved", dataset="test_dataset", metrics={"my_awesome_metric": 0.99})
        restored = smp.from_pretrained(str(tmp_path / "saved")).eval()
        x = sample(batch=self.batch(arch), size=self.size(arch))
        with torch.inference_mode():
            torch.testing.assert_close(model(x), restored(x), rtol=0, atol=0)
        readme = (tmp_path / "saved" / "README.md").read_text()
        assert "test_dataset" in readme and "my_awesome_metric" in readme
        # Where the ImageNet file is absent, the saved weights still load with encoder_weights=None.
        monkeypatch.delenv(plugin.WEIGHTS_DIR_ENV)
        with pytest.raises(FileNotFoundError):
            smp.from_pretrained(str(tmp_path / "saved"))
        restored = smp.from_pretrained(str(tmp_path / "saved"), encoder_weights=None).eval()
        with torch.inference_mode():
            torch.testing.assert_close(model(x), restored(x), rtol=0, atol=0)

    def test_torch_script(self, arch: str) -> None:
        model = smp.create_model(arch, B0).eval()
        if not model._is_torch_scriptable:  # smp's UnetPlusPlus decoder
            with pytest.raises(RuntimeError):
                torch.jit.script(model)
            return
        scripted = torch.jit.script(model)
        x = sample(batch=self.batch(arch), size=self.size(arch))
        with torch.inference_mode():
            torch.testing.assert_close(scripted(x), model(x), rtol=1e-3, atol=1e-3)

    @pytest.mark.slow
    def test_torch_export(self, arch: str) -> None:
        model = smp.create_model(arch, B0).eval()
        x = sample(batch=self.batch(arch), size=self.size(arch))
        exported = torch.export.export(model, args=(x,), strict=True)
        with torch.inference_mode():
            torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)

    @pytest.mark.slow
    def test_compile(self, arch: str) -> None:
        model = smp.create_model(arch, B0).eval()
        torch.compiler.reset()
        compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
        with torch.inference_mode():
            compiled(sample(batch=self.batch(arch), size=self.size(arch)))


def test_freeze_encoder_keeps_norm_statistics() -> None:
    # smp tests/base/test_freeze_encoder.py, with our encoder.
    model = smp.Unet(B0, encoder_weights=None)
    model.freeze_encoder()
    model.train()
    assert not any(p.requires_grad for p in model.encoder.parameters())
    bn = model.encoder.model.bn1
    assert not bn.training
    mean = bn.running_mean.clone()
    model(sample(batch=2))
    torch.testing.assert_close(mean, bn.running_mean)
    model.unfreeze_encoder()
    assert all(p.requires_grad for p in model.encoder.parameters()) and bn.training
