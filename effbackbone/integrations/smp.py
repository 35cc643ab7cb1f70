"""segmentation-models-pytorch plug-in: ``smp.Unet("effbackbone-b0", ...)`` and every other smp decoder.

``import effbackbone.integrations.smp`` registers every variant in smp's encoder registry
(``effbackbone-b0`` .. ``-b7``, ``-lite0`` .. ``-lite4``, ``-v2-s``, ``-v2-m``, ``-v2-l``); it is
idempotent, and :func:`register` does the same. :func:`register_custom` adds a name with any
``create_model`` option, e.g. a compound coefficient: ``register_custom("effbackbone-phi2.5", "b0",
phi=2.5)`` (smp's ``get_encoder`` does not forward extra kwargs to registry encoders, so options
live in the registered ``params``).

smp's encoder contract (``EncoderMixin``): ``forward`` returns ``depth + 1`` maps, the input first,
then strides 2, 4, .., 2**depth (our C1..C5, the same tensors as timm's ``features_only``);
``out_channels`` starts with the input channels. ``depth`` < 5 drops the unused stages, so DDP sees
no parameter without a gradient. ``output_stride`` 8/16 dilates natively, like timm and DeepLab.

``encoder_weights="imagenet"`` (and any other source name, e.g. ``"torchvision"``) resolves as
``create_model(weights=...)`` does (:mod:`effbackbone.hub`: ``$EFFBACKBONE_WEIGHTS_DIR``, the caches,
then one download); a path (``encoder_weights="/ckpt/b0.safetensors"``) is used as it is. smp reads
weights through ``huggingface_hub.hf_hub_download``, so the file is then linked into the Hugging Face
cache under a content-derived commit hash, which that function returns without any network access.
smp builds the encoder before it knows the weights: TF-ported weights carry a marker key that makes the
encoder switch to TF padding when they load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from effbackbone.arch import VARIANTS
from effbackbone.factory import create_model, weights_bn_eps
from effbackbone.hub import WeightsUnavailableError, find_in_weights_dir, resolve_weights
from effbackbone.sources import is_source
from effbackbone.weights import (
    LAYOUT_TF_COMPAT,
    detect_layout,
    efficientnet_pytorch_to_timm,
    load_weights,
    read_state_dict,
    to_tf_compat,
    torchvision_to_timm,
    unwrap_state_dict,
)

try:
    from segmentation_models_pytorch.encoders import encoders as _SMP_ENCODERS
    from segmentation_models_pytorch.encoders._base import EncoderMixin
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "effbackbone.integrations.smp needs segmentation-models-pytorch: pip install 'effbackbone[smp]'"
    ) from e

PREFIX = "effbackbone-"
WEIGHTS_DIR_ENV = "EFFBACKBONE_WEIGHTS_DIR"
_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_LOCAL_REPO = "effbackbone-local/weights"
# Key added to a staged file of TF-ported weights: the encoder, built before smp loads them, switches to TF padding.
TF_MARKER = "effbackbone.tf_compat"
# Options fixed by smp's get_encoder / by the encoder itself; they cannot go into params.
_RESERVED = frozenset({"features_only", "out_indices", "in_channels", "num_classes", "depth", "output_stride"})


def smp_name(variant: str) -> str:
    """The smp encoder name of a variant key: ``"v2_s"`` -> ``"effbackbone-v2-s"``."""
    return PREFIX + variant.replace("_", "-")


class EffBackboneEncoder(nn.Module, EncoderMixin):
    """An :class:`~effbackbone.model.EfficientNet` behind smp's ``EncoderMixin`` contract.

    Args:
        variant: ``b0``..``b7``, ``lite0``..``lite4``, ``v2_s``, ``v2_m``, ``v2_l``.
        depth: Number of downsamplings returned, 1..5 (smp's ``encoder_depth``).
        output_stride: 32, or 16 / 8 to dilate the last stages (smp's ``encoder_output_stride``).
        weights: A local checkpoint loaded at construction (for :func:`register_custom`).
        **options: Any other ``create_model`` option (``phi``, ``tf_compat``, ``drop_path_rate``,
            ``stem_adapt``, ``frozen_stages``, ...).
    """

    _is_torch_scriptable = True
    _is_torch_exportable = True
    _is_torch_compilable = True

    def __init__(
        self,
        variant: str,
        depth: int = 5,
        output_stride: int = 32,
        weights: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 32, 16 or 8, got {output_stride}")
        reserved = _RESERVED & set(options)
        if reserved:
            raise TypeError(f"{sorted(reserved)} are set by smp (encoder_depth, in_channels, ...), not as options")
        super().__init__()
        self.model = create_model(
            variant, weights=weights, out_indices=range(depth), output_stride=output_stride, **options
        )
        # Stages after the deepest returned level would never get a gradient: drop them.
        self.model.truncate()
        self._variant = variant
        self._bn_eps = options.get("bn_eps")
        self._depth = depth
        self._in_channels = 3
        self._output_stride = output_stride
        self._out_channels = [3, *self.model.feature_channels]
        self._names = [s.name for s in self.model.feature_specs]
        self._pretrained = weights is not None
        self._stem_adapt = str(options.get("stem_adapt", "repeat"))

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[x, C1, .., C{depth}]``: the input, then strides 2 .. 2**depth (or the dilated strides)."""
        levels = self.model.forward_pyramid(x)
        features = [x]
        for name in self._names:
            features.append(levels[name])
        return features

    # -- smp's EncoderMixin hooks ---------------------------------------------------------------
    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """Change the stem to ``in_channels`` inputs (:meth:`EfficientNet.set_in_channels`).

        A pretrained stem is adapted with ``stem_adapt`` (default ``repeat``: the RGB filters are
        cycled and scaled by ``3 / in_channels``, which is smp's own rule); otherwise it is
        re-initialised.
        """
        adapt = self._stem_adapt if pretrained or self._pretrained else "random"
        self.model.set_in_channels(in_channels, adapt)
        self._in_channels = in_channels
        self._out_channels[0] = in_channels

    def get_stages(self) -> dict[int, Sequence[nn.Module]]:
        """The stages that produce stride 16 and stride 32 (what smp would dilate; empty when dropped for depth)."""
        ends = [s.stage for s in self.model.all_feature_specs]
        ends += [len(self.model.blocks) - 1] * (5 - len(ends))  # levels truncated away for depth < 5
        return {16: [self.model.blocks[ends[2] + 1 : ends[3] + 1]], 32: [self.model.blocks[ends[3] + 1 :]]}

    def make_dilated(self, output_stride: int) -> None:
        """Dilate to ``output_stride`` 16 or 8, in place, exactly as building with that stride would.

        smp's generic version dilates every block of a stage; here the first block of a dilated
        stage keeps the previous dilation (timm, DeepLab), so pretrained features stay the same
        tensors as timm's ``output_stride`` (:meth:`EfficientNet.set_output_stride`). Weights, device
        and frozen state are kept.
        """
        if output_stride not in (8, 16):
            raise ValueError(f"Output stride should be 16 or 8, got {output_stride}.")
        current = self.model.cfg.output_stride
        if output_stride == current:
            return
        if output_stride > current:
            raise ValueError(
                f"encoder is already dilated to output stride {current}; build a new one for {output_stride}"
            )
        self.model.set_output_stride(output_stride)
        self._output_stride = output_stride

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load this encoder's own state dict, or a timm / torchvision checkpoint.

        Checkpoint keys without the ``model.`` prefix are an ImageNet checkpoint (what smp's
        ``get_encoder`` passes): its classifier head and the stages dropped for ``depth`` < 5 are
        ignored, torchvision keys are renamed, and a 3-channel stem is adapted.
        """
        if any(k.startswith("model.") for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        sd = unwrap_state_dict(state_dict)
        marked = sd.pop(TF_MARKER, None) is not None
        if (marked or LAYOUT_TF_COMPAT.get(detect_layout(sd))) and self.model.cfg.padding != "same":
            to_tf_compat(self.model)
        if detect_layout(sd) == "efficientnet_pytorch":
            sd = efficientnet_pytorch_to_timm(sd, self.model)  # before stages are dropped: it numbers blocks flat
        if detect_layout(sd) == "torchvision":
            # BN eps is not in the state dict; torchvision trained B5-B7 and V2 with 1e-3.
            self.model.set_bn_eps(weights_bn_eps(self._variant, "torchvision", bn_eps=self._bn_eps))
        sd = self._drop_truncated(sd)
        if not strict:
            if detect_layout(sd) == "torchvision":
                sd = torchvision_to_timm(sd, self.model)
            return self.model.load_state_dict(sd, strict=False, assign=assign)
        load_weights(self.model, sd, self._stem_adapt)
        self._pretrained = True
        return _IncompatibleKeys([], [])

    def _drop_truncated(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Drop checkpoint keys of the stages removed for ``depth`` < 5 (and torchvision's head)."""
        kept = len(self.model.blocks)
        pattern = re.compile(r"(blocks|features)\.(\d+)\.")

        def keep(key: str) -> bool:
            m = pattern.match(key)
            if m is None:
                return True
            # torchvision's features.0 is the stem, so stage s is features.{s+1}.
            return int(m[2]) < kept if m[1] == "blocks" else int(m[2]) <= kept

        return {k: v for k, v in sd.items() if keep(k)}


# -- weights: effbackbone.hub's resolution, staged for smp ------------------------------------------------
def _candidate_stems(name: str, variant: str | None) -> list[str]:
    stems = [name, name.removeprefix(PREFIX)]
    if variant is not None:
        stems += [variant, f"efficientnet_{variant}"]
    return list(dict.fromkeys(stems))


def find_imagenet_weights(name: str, variant: str | None = None, tf_compat: bool | None = None) -> Path | None:
    """The local file ``encoder_weights="imagenet"`` would use for ``name``, or ``None``. Nothing is downloaded.

    With ``variant``: :func:`effbackbone.hub.resolve_weights` without its download step
    (``$EFFBACKBONE_WEIGHTS_DIR``, an installed Lite weights package, the Hugging Face cache of the
    variant's timm repo). Without (custom names): ``$EFFBACKBONE_WEIGHTS_DIR/<name><suffix>`` only.
    """
    if variant is None:
        return find_in_weights_dir(_candidate_stems(name, None))
    try:
        return resolve_weights(variant, "imagenet", tf_compat=tf_compat, download=False).path
    except WeightsUnavailableError:
        return None


def stage_weights(path: Path, mean: Sequence[float], std: Sequence[float], tf_compat: bool = False) -> dict[str, str]:
    """Make ``path`` loadable by smp's ``get_encoder`` offline; returns smp ``pretrained_settings``.

    The file is linked (``.safetensors``) or converted (pickle formats) into the Hugging Face cache
    at revision ``sha1(path, size, mtime, mean, std, tf_compat)``; ``hf_hub_download`` returns a cached file at a
    commit hash without contacting the Hub, and a changed file gets a new revision. ``tf_compat`` adds
    :data:`TF_MARKER` to the staged copy.
    """
    from huggingface_hub import constants

    # The file's own name tells its format; a Hugging Face cache entry links to a blob named by its hash.
    path = path.expanduser().absolute()
    real = path.resolve()
    stat = real.stat()
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}|{list(mean)}|{list(std)}" + ("|tf" if tf_compat else "")
    revision = hashlib.sha1(key.encode()).hexdigest()
    folder = Path(constants.HF_HUB_CACHE) / ("models--" + _LOCAL_REPO.replace("/", "--")) / "snapshots" / revision
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"cannot stage {path} for smp in the Hugging Face cache {constants.HF_HUB_CACHE} ({e}); "
            "set HF_HUB_CACHE to a writable folder, or build with encoder_weights=None and call "
            "model.encoder.load_state_dict(effbackbone.read_state_dict(path))"
        ) from e
    target = folder / "model.safetensors"
    if not target.exists():
        tmp = folder / f".model.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        if path.suffix == ".safetensors" and not tf_compat:
            try:
                tmp.symlink_to(real)
            except OSError:  # no symlinks (e.g. Windows without developer mode)
                shutil.copyfile(real, tmp)
        else:
            from safetensors.torch import save_file

            # clone: safetensors refuses tensors that share storage (tied or sliced views).
            tensors = {k: v.detach().clone().contiguous() for k, v in read_state_dict(path).items()}
            if tf_compat:
                tensors[TF_MARKER] = torch.ones(())
            save_file(tensors, str(tmp))
        os.replace(tmp, target)  # atomic: concurrent ranks never see a half-written file
    config = folder / "config.json"
    if not config.exists():
        tmp_config = folder / f".config.{os.getpid()}.tmp"
        tmp_config.write_text(
            json.dumps(
                {"input_space": "RGB", "input_range": [0, 1], "mean": list(mean), "std": list(std), "source": str(path)}
            )
        )
        os.replace(tmp_config, config)
    return {"repo_id": _LOCAL_REPO, "revision": revision}


class LocalWeights(Mapping[str, dict[str, str]]):
    """smp ``pretrained_settings`` that resolve ``"imagenet"``, another source name or a file path to a local file."""

    def __init__(
        self, name: str, variant: str | None, unit_range: bool = False, tf_compat: bool | None = None,
        custom: bool = False,
    ) -> None:
        self.name, self.variant, self.tf_compat, self.custom = name, variant, tf_compat, custom
        # The TF ports of Lite and V2 (timm tf_*) expect [-1, 1] inputs; the PyTorch-trained timm and
        # torchvision checkpoints that the built-in names find, ImageNet mean/std.
        self.mean = (0.5, 0.5, 0.5) if unit_range else (0.485, 0.456, 0.406)
        self.std = (0.5, 0.5, 0.5) if unit_range else (0.229, 0.224, 0.225)

    def __iter__(self) -> Iterator[str]:
        return iter(("imagenet",))

    def __len__(self) -> int:
        return 1

    def __contains__(self, key: object) -> bool:
        return key == "imagenet" or key is True or _is_path_like(key) or is_source(key)

    def __getitem__(self, key: object) -> dict[str, str]:
        spec = "imagenet" if key is True else key
        if isinstance(spec, str) and is_source(spec) and not Path(spec).expanduser().is_file():
            return self._resolve(spec)
        if _is_path_like(key):
            path = Path(os.fspath(key)).expanduser()  # type: ignore[arg-type]
            if not path.is_file():
                raise FileNotFoundError(f"encoder_weights file not found: {path} (pass an existing local file)")
        else:
            raise KeyError(key)
        return stage_weights(path, self.mean, self.std)

    def _resolve(self, spec: str) -> dict[str, str]:
        """A source name: :func:`effbackbone.hub.resolve_weights` (weights dir, caches, download).

        A :func:`register_custom` name first looks for ``$EFFBACKBONE_WEIGHTS_DIR/<name>.*``; a compound-scaled
        one (``phi``...) has no published weights.
        """
        if self.custom:
            path = find_in_weights_dir(_candidate_stems(self.name, None))
            if path is not None:
                return stage_weights(path, self.mean, self.std)
        if self.variant is None:
            raise FileNotFoundError(
                f"no local ImageNet weights for {self.name!r} (compound-scaled models have no published ones): put "
                f"a checkpoint at ${WEIGHTS_DIR_ENV}/{self.name.removeprefix(PREFIX)}.safetensors (or .pth), pass "
                f"encoder_weights='/path/to/file.safetensors', or encoder_weights=None"
            )
        try:
            resolved = resolve_weights(self.variant, spec, tf_compat=self.tf_compat)
        except WeightsUnavailableError as e:
            raise WeightsUnavailableError(f"{e}; in smp also encoder_weights=None (random init)") from None
        source = resolved.source
        assert source is not None  # a source name, not a path
        return stage_weights(resolved.path, source.mean, source.std, tf_compat=bool(source.tf_compat))


def _is_path_like(key: object) -> bool:
    if isinstance(key, os.PathLike):
        return True
    return isinstance(key, str) and ("/" in key or os.sep in key or key.endswith(_SUFFIXES))


# -- registration ----------------------------------------------------------------------------------
def _entry(
    name: str, params: dict[str, Any], variant: str | None, unit_range: bool = False, custom: bool = False
) -> dict[str, Any]:
    weights = LocalWeights(name, variant, unit_range, params.get("tf_compat") if custom else None, custom)
    return {"encoder": EffBackboneEncoder, "pretrained_settings": weights, "params": params}


def register() -> list[str]:
    """Register every variant in smp's encoder registry (idempotent); returns the names."""
    names = []
    for key in VARIANTS:
        name = smp_name(key)
        _SMP_ENCODERS[name] = _entry(name, {"variant": key}, key)
        names.append(name)
    return names


def register_custom(name: str, variant: str = "b0", **options: Any) -> str:
    """Register ``name`` as ``variant`` built with extra ``create_model`` options; returns ``name``.

    Example: ``register_custom("effbackbone-phi2.5", "b0", phi=2.5)`` then
    ``smp.Unet("effbackbone-phi2.5", encoder_weights=None)``. ``weights=<path>`` loads a checkpoint
    at construction; ``encoder_weights="imagenet"`` looks for ``$EFFBACKBONE_WEIGHTS_DIR/<name>.*``.
    """
    existing = _SMP_ENCODERS.get(name)
    if existing is not None and existing["encoder"] is not EffBackboneEncoder:
        raise ValueError(f"{name!r} is already an smp encoder of another library; choose another name")
    weights = options.get("weights")
    if weights is not None and not Path(weights).expanduser().is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    # Validate the options now (on the meta device: no memory, no init cost), not at model build.
    with torch.device("meta"):
        probe = EffBackboneEncoder(variant, **{k: v for k, v in options.items() if k != "weights"})
    unit_range = bool(options.get("tf_compat")) and probe.model.cfg.variant.family != "efficientnet"
    scaled = any(k in options for k in ("phi", "alpha", "beta", "gamma"))
    _SMP_ENCODERS[name] = _entry(name, {"variant": variant, **options}, None if scaled else variant, unit_range, True)
    return name


ENCODER_NAMES = register()

__all__ = [
    "ENCODER_NAMES",
    "PREFIX",
    "WEIGHTS_DIR_ENV",
    "EffBackboneEncoder",
    "LocalWeights",
    "find_imagenet_weights",
    "register",
    "register_custom",
    "smp_name",
    "stage_weights",
]
