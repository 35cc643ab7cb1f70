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

``encoder_weights`` never downloads: ``"imagenet"`` looks for a local file (see
:func:`find_imagenet_weights`), and a path (``encoder_weights="/ckpt/b0.safetensors"``) is used as
it is. smp reads weights through ``huggingface_hub.hf_hub_download``, so the file is linked into the
Hugging Face cache under a content-derived commit hash, which that function returns without any
network access.
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
from effbackbone.weights import detect_layout, load_weights, read_state_dict, torchvision_to_timm, unwrap_state_dict

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


# -- weights: local files only ---------------------------------------------------------------------
def _candidate_stems(name: str, variant: str | None) -> list[str]:
    stems = [name, name.removeprefix(PREFIX)]
    if variant is not None:
        stems += [variant, f"efficientnet_{variant}"]
    return list(dict.fromkeys(stems))


def find_imagenet_weights(name: str, variant: str | None = None) -> Path | None:
    """A local ImageNet checkpoint for ``name``, or ``None``. Nothing is downloaded.

    Looked up in order:

    1. ``$EFFBACKBONE_WEIGHTS_DIR/<stem><suffix>`` with stem ``effbackbone-b0``, ``b0`` or
       ``efficientnet_b0`` and suffix ``.safetensors``, ``.pth``, ``.pt`` or ``.bin``.
    2. torchvision's download cache: ``$TORCH_HOME/hub/checkpoints/efficientnet_b0_*.pth``
       (``efficientnet_v2_s-*.pth`` for V2).
    3. timm's Hugging Face cache: ``models--timm--efficientnet_b0.*/snapshots/*/model.safetensors``
       (timm's PyTorch-trained B0-B5 and Lite0; its ``tf_*`` weights need ``tf_compat=True``, see
       :func:`register_custom`).
    """
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        for stem in _candidate_stems(name, variant):
            for suffix in _SUFFIXES:
                path = Path(env).expanduser() / f"{stem}{suffix}"
                if path.is_file():
                    return path
    if variant is None:
        return None
    tv_name = f"efficientnet_{variant}"  # torchvision's names: efficientnet_b0, efficientnet_v2_s
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(checkpoints.glob(f"{tv_name}_*.pth")) + sorted(checkpoints.glob(f"{tv_name}-*.pth"))
    if found:
        return found[0]
    from huggingface_hub import constants

    pattern = f"models--timm--efficientnet_{variant}.*/snapshots/*/model.safetensors"
    found = sorted(Path(constants.HF_HUB_CACHE).glob(pattern))
    return found[0] if found else None


def stage_weights(path: Path, mean: Sequence[float], std: Sequence[float]) -> dict[str, str]:
    """Make ``path`` loadable by smp's ``get_encoder`` offline; returns smp ``pretrained_settings``.

    The file is linked (``.safetensors``) or converted (pickle formats) into the Hugging Face cache
    at revision ``sha1(path, size, mtime, mean, std)``; ``hf_hub_download`` returns a cached file at a commit
    hash without contacting the Hub, and a changed file gets a new revision.
    """
    from huggingface_hub import constants

    path = path.expanduser().resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{list(mean)}|{list(std)}"
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
        if path.suffix == ".safetensors":
            try:
                tmp.symlink_to(path)
            except OSError:  # no symlinks (e.g. Windows without developer mode)
                shutil.copyfile(path, tmp)
        else:
            from safetensors.torch import save_file

            # clone: safetensors refuses tensors that share storage (tied or sliced views).
            save_file({k: v.detach().clone().contiguous() for k, v in read_state_dict(path).items()}, str(tmp))
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
    """smp ``pretrained_settings`` that resolve ``"imagenet"`` or a file path to a local file."""

    def __init__(self, name: str, variant: str | None, unit_range: bool = False) -> None:
        self.name, self.variant = name, variant
        # The TF ports of Lite and V2 (timm tf_*) expect [-1, 1] inputs; the PyTorch-trained timm and
        # torchvision checkpoints that the built-in names find, ImageNet mean/std.
        self.mean = (0.5, 0.5, 0.5) if unit_range else (0.485, 0.456, 0.406)
        self.std = (0.5, 0.5, 0.5) if unit_range else (0.229, 0.224, 0.225)

    def __iter__(self) -> Iterator[str]:
        return iter(("imagenet",))

    def __len__(self) -> int:
        return 1

    def __contains__(self, key: object) -> bool:
        return key == "imagenet" or key is True or _is_path_like(key)

    def __getitem__(self, key: object) -> dict[str, str]:
        if key == "imagenet" or key is True:
            path = find_imagenet_weights(self.name, self.variant)
            if path is None:
                raise FileNotFoundError(
                    f"no local ImageNet weights for {self.name!r} (nothing is downloaded). Put a timm or "
                    f"torchvision checkpoint at ${WEIGHTS_DIR_ENV}/{self.name.removeprefix(PREFIX)}.safetensors "
                    f"(or .pth), pass encoder_weights='/path/to/file.safetensors', or encoder_weights=None"
                )
        elif _is_path_like(key):
            path = Path(os.fspath(key)).expanduser()  # type: ignore[arg-type]
            if not path.is_file():
                raise FileNotFoundError(f"encoder_weights file not found: {path} (pass an existing local file)")
        else:
            raise KeyError(key)
        return stage_weights(path, self.mean, self.std)


def _is_path_like(key: object) -> bool:
    if isinstance(key, os.PathLike):
        return True
    return isinstance(key, str) and ("/" in key or os.sep in key or key.endswith(_SUFFIXES))


# -- registration ----------------------------------------------------------------------------------
def _entry(name: str, params: dict[str, Any], variant: str | None, unit_range: bool = False) -> dict[str, Any]:
    return {
        "encoder": EffBackboneEncoder,
        "pretrained_settings": LocalWeights(name, variant, unit_range),
        "params": params,
    }


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
    _SMP_ENCODERS[name] = _entry(name, {"variant": variant, **options}, None, unit_range)
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
