"""int8 with OpenVINO and NNCF: the float model converted from PyTorch, calibrated, saved as OpenVINO IR.

``quantize_int8(model, calibration, backend="openvino")`` lands here. The network is made ready as for ONNX
(:func:`effbackbone.runtime.prepare_for_runtime`: BN folded, outputs flattened, static TF padding where exact),
converted with ``openvino.convert_model`` (batch, height and width dynamic, unless the model has a fixed size),
quantized by ``nncf.quantize`` (int8 per-channel weights, int8 activations, fast bias correction), and returned
as an :class:`OpenVinoModel`, which is called like the float model and saves an ``.xml`` + ``.bin`` pair whose
``<rt_info>`` carries the same ``effbackbone`` entries as our ONNX files (kind, input rules, outputs, task).

Why a second backend (docs/deploy.md, 2-core AVX512-VNNI CPU, one thread): ONNX Runtime runs a SiLU network's
activations and SE gates as separate int8 operators (QLinearSigmoid, QLinearMul) that cost as much as its
convolutions; OpenVINO fuses them into its int8 kernels. B0 int8 ran 3.7x timm's best eager fp32 setting against
2.2x, U-Net-B0 4.9x against 2.6x, EfficientDet-D0 2.8x against 2.6x. Converting from PyTorch, not from our ONNX
file, matters: the ONNX import of B0 quantized to 37.7 ms per batch, the PyTorch one to 26.0 ms. For the ReLU6
Lite models ONNX Runtime stays the better choice (Lite0: top-1 agreement with fp32 0.93 against 0.83).

OpenVINO's converter and NNCF report each use to Intel (Google Analytics, ``openvino_telemetry``) unless the user
has opted out with ``opt_in_out --opt_out``: without a consent file they count as consent. A library call is not
the user running an OpenVINO tool, so :func:`quantize_openvino` turns that reporting off for its own calls
(:func:`without_telemetry`); OpenVINO's tools and direct NNCF use are left as they are.
Torch only at import; ``openvino`` and ``nncf`` are imported when needed (``effbackbone[openvino]``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from effbackbone.export import INPUT_NAME
from effbackbone.runtime import SUFFIX_OF, Outputs, leaf_names, prepare_for_runtime, rules_of, unflatten_outputs

if TYPE_CHECKING:
    import numpy as np

RT_KEY = "effbackbone"  # the <rt_info> section of our entries
SUFFIX = SUFFIX_OF["openvino"]


@functools.cache
def core() -> Any:  # noqa: ANN401 - an openvino.Core
    """The process's one ``openvino.Core`` (OpenVINO's advice: each Core keeps its own plugins and thread pools)."""
    return require("openvino").Core()


def require(name: str) -> ModuleType:
    """Import ``openvino`` or ``nncf``, or say which extra installs them."""
    check_installed(name)
    return importlib.import_module(name)


def check_installed(*names: str) -> None:
    """Raise ``ImportError`` naming the extra unless ``names`` (default: openvino and nncf) are installed.

    Nothing is imported (NNCF counts a use when it is imported).
    """
    for name in names or ("openvino", "nncf"):
        if importlib.util.find_spec(name) is None:
            raise ImportError(
                f"{name} is required for OpenVINO int8 models; install it with `pip install effbackbone[openvino]` "
                "(or use backend='onnxruntime', the .onnx format)"
            )


class OpenVinoModel:
    """An OpenVINO model (IR ``.xml`` + ``.bin``) run on the CPU, called like the float model.

    The model keeps dynamic batch, height and width, but OpenVINO runs a static shape faster (EfficientDet-D0
    int8 at 2 x 256 x 256: 17.3 ms against 21.2 ms dynamic), so each of the first ``static_shapes`` input shapes
    gets its own compiled copy (0.2-0.8 s to compile, once); later new shapes run on the dynamic one.

    Args:
        model: An ``openvino.Model`` or the path of its ``.xml`` file (the ``.bin`` lies next to it).
        metadata: The ``effbackbone`` entries (read from the file's ``<rt_info>`` when ``model`` is a path).
        num_threads: OpenVINO inference threads (``None``: its default, the physical cores).
        static_shapes: How many input shapes get a static compiled copy (0: always the dynamic model).

    Attributes:
        metadata: The ``effbackbone`` entries (``kind``, ``input``, ``outputs``, ``quantization``, ``task``, ...).
        rules: The input rules every call is checked against.
    """

    def __init__(
        self, model: Any, *, metadata: Mapping[str, Any] | None = None, num_threads: int | None = None,
        static_shapes: int = 4,
    ) -> None:  # noqa: ANN401 - an openvino.Model  # fmt: skip
        if isinstance(model, (str, Path)):
            path = Path(model)
            metadata = read_ir_metadata(path)
            model = core().read_model(str(path))
        if metadata is None or "outputs" not in metadata or "input" not in metadata:
            raise ValueError("the OpenVINO model has no effbackbone metadata (outputs, input rules); make it with "
                             "effbackbone.quantize.quantize_int8(..., backend='openvino')")  # fmt: skip
        self.model = model
        self.metadata = dict(metadata)
        self.rules = rules_of(self.metadata)
        self._names = leaf_names(self.metadata["outputs"])
        self._config = {} if num_threads is None else {"INFERENCE_NUM_THREADS": int(num_threads)}
        index = {name: i for i, out in enumerate(model.outputs) for name in out.get_names()}
        self._index = [index[n] for n in self._names]  # the order outputs keep through reshape and compile
        self.static_shapes = int(static_shapes)
        self._static: dict[tuple[int, ...], Any] = {}
        self._size: int | None = None

    @functools.cached_property
    def compiled(self) -> Any:  # noqa: ANN401 - an openvino.CompiledModel
        """The model compiled for any input shape (on first need: shapes past ``static_shapes``)."""
        return core().compile_model(self.model, "CPU", self._config)

    @property
    def kind(self) -> str:
        """``encoder``, ``classifier``, ``segmentation``, ``efficientdet`` or ``module``."""
        return str(self.metadata["kind"])

    @property
    def static_compiled(self) -> list[tuple[int, ...]]:
        """The input shapes that have their own static compiled copy, in the order they came."""
        return list(self._static)

    @property
    def quantization(self) -> dict[str, Any]:
        """How the model was quantized."""
        return dict(self.metadata["quantization"])

    @property
    def size_bytes(self) -> int:
        """Size of the saved ``.xml`` and ``.bin`` together (of the last :meth:`save`, else of a scratch save)."""
        if self._size is None:
            with tempfile.TemporaryDirectory() as tmp:
                self.save(Path(tmp) / "model.xml")
        assert self._size is not None
        return self._size

    def __call__(self, x: Tensor, what: str = "input") -> Outputs:
        """Run a batch ``(N, C, H, W)``; returns the float model's kind of output, as CPU float tensors.

        ``what`` names the input in the error a wrong batch raises.
        """
        self.rules.check(x, what)
        results = self._compiled_for(tuple(x.shape))(x.detach().to("cpu", torch.float32).contiguous().numpy())
        flat = {n: torch.from_numpy(results[i]) for n, i in zip(self._names, self._index, strict=True)}
        return unflatten_outputs(flat, self.metadata["outputs"])

    def _compiled_for(self, shape: tuple[int, ...]) -> Any:  # noqa: ANN401 - an openvino.CompiledModel
        """The static compiled copy for ``shape`` (made on first use, up to ``static_shapes``), else the dynamic one."""
        if shape not in self._static and len(self._static) < self.static_shapes:
            static = self.model.clone()
            static.reshape(list(shape))
            self._static[shape] = core().compile_model(static, "CPU", self._config)
        return self._static[shape] if shape in self._static else self.compiled

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.xml``) and its ``.bin``, metadata in ``<rt_info>``; parent folders are created."""
        ov = require("openvino")
        path = Path(path)
        if path.suffix.lower() != SUFFIX:
            raise ValueError(f"an OpenVINO model is saved as an .xml file (with a .bin next to it), got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        from effbackbone import __version__

        for key, value in {"version": __version__, **self.metadata}.items():
            self.model.set_rt_info(value if key == "version" else json.dumps(value), [RT_KEY, key])
        # fp32 stays fp32: compressing the float weights that int8 leaves (biases, SE) to fp16 changes the outputs.
        ov.save_model(self.model, str(path), compress_to_fp16=False)
        self._size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
        return path


# What openvino_telemetry.Telemetry does on creation and to report; all no-ops while without_telemetry() runs.
_TELEMETRY_METHODS = ("init", "start_session", "send_event", "send_error", "send_stack_trace", "end_session",
                      "force_shutdown")  # fmt: skip


@contextlib.contextmanager
def without_telemetry() -> Iterator[None]:
    """Within the block, OpenVINO's and NNCF's usage reports (``openvino_telemetry``) neither count nor send.

    Both report through the one ``openvino_telemetry.Telemetry`` class, whose methods are replaced by no-ops for the
    block and restored after it.
    """
    try:
        from openvino_telemetry import Telemetry
    except ImportError:  # then neither reports anything
        yield
        return
    saved = {name: Telemetry.__dict__[name] for name in _TELEMETRY_METHODS if name in Telemetry.__dict__}
    for name in saved:
        setattr(Telemetry, name, lambda self, *args, **kwargs: None)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(Telemetry, name, method)


@contextlib.contextmanager
def _quiet_conversion() -> Iterator[None]:
    """Silence what OpenVINO's converter and NNCF print that is theirs, not the user's to act on.

    The converter traces with ``torch.jit.trace`` (a FutureWarning: deprecated), and NNCF's import probes
    torch's C++ extension tools, which log "No CUDA runtime is found" for a CUDA build of torch on a CPU machine.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.trace(_method)?` is deprecated", category=FutureWarning
            )
            yield
    finally:
        logger.setLevel(level)


def read_ir_metadata(path: str | Path) -> dict[str, Any]:
    """The ``effbackbone`` entries of an OpenVINO ``.xml`` file, read without loading the model.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is not OpenVINO IR (an ``<net>`` XML document).
    """
    import xml.etree.ElementTree as ET

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no OpenVINO model file at {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path} is not an OpenVINO model (.xml): {e}") from e
    if root.tag != "net":
        raise ValueError(f"{path} is not an OpenVINO model (.xml): its root element is <{root.tag}>, not <net>")
    section = root.find(f"rt_info/{RT_KEY}")
    out: dict[str, Any] = {}
    for entry in [] if section is None else list(section):
        value = entry.get("value", "")
        out[entry.tag] = value if entry.tag == "version" else json.loads(value)
    return out


def load_openvino_model(path: str | Path, *, num_threads: int | None = None, static_shapes: int = 4) -> OpenVinoModel:
    """Load an ``.xml`` file saved by :class:`OpenVinoModel` (``quantize_int8(..., backend="openvino")``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no OpenVINO model file at {path}")
    if not path.with_suffix(".bin").is_file():
        raise FileNotFoundError(f"{path} has no weights file next to it ({path.with_suffix('.bin').name}); copy "
                                "the .xml and the .bin that quantize_int8 wrote together")  # fmt: skip
    return OpenVinoModel(path, num_threads=num_threads, static_shapes=static_shapes)


def quantize_openvino(
    model: nn.Module,
    batches: Sequence[np.ndarray],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    metadata: Mapping[str, Any] | None = None,
    size_divisibility: int | None = None,
    bias_correction: bool = True,
    num_threads: int | None = None,
) -> OpenVinoModel:
    """int8 OpenVINO model of ``model`` calibrated on ``batches`` (checked by ``quantize_int8``, which calls this).

    The arguments are :func:`effbackbone.quantize.quantize_int8`'s. NNCF's defaults: symmetric int8 weights per
    output channel, int8 activations per tensor from min/max over the calibration, fast bias correction (turned
    off by ``bias_correction=False``).
    """
    example = torch.from_numpy(batches[0][:1])
    prepared = prepare_for_runtime(model, example, mean=mean, std=std, size_divisibility=size_divisibility)
    fixed = prepared.rules.fixed_size
    shape = [-1, prepared.rules.channels, *(fixed if fixed is not None else (-1, -1))]
    with without_telemetry(), _quiet_conversion(), torch.no_grad():  # NNCF counts a use on import already
        ov = require("openvino")
        nncf = require("nncf")
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

        network = ov.convert_model(prepared.flat, example_input=example, input=[ov.PartialShape(shape)])
        network.inputs[0].get_tensor().set_names({INPUT_NAME})
        for out, name in zip(network.outputs, prepared.output_names, strict=True):
            out.get_tensor().set_names({name})
        advanced = AdvancedQuantizationParameters(disable_bias_correction=not bias_correction)
        quantized = nncf.quantize(
            network, nncf.Dataset(list(batches)), subset_size=len(batches), advanced_parameters=advanced
        )
    recipe = {
        "backend": "openvino-nncf", "weights": "int8, per channel", "activations": "int8, per tensor",
        "calibration": "minmax", "bias_correction": bool(bias_correction), "calibration_batches": len(batches),
        "calibration_images": int(sum(b.shape[0] for b in batches)),
    }  # fmt: skip
    return OpenVinoModel(quantized, metadata=prepared.metadata({**dict(metadata or {}), "quantization": recipe}),
                         num_threads=num_threads)  # fmt: skip


__all__ = [
    "OpenVinoModel",
    "check_installed",
    "load_openvino_model",
    "quantize_openvino",
    "read_ir_metadata",
    "without_telemetry",
]
