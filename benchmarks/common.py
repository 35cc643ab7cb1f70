"""Shared harness: malloc settings, interleaved timing, paired ratios, saved-tensor memory, JSON out.

Importing this module first re-executes the process with glibc malloc tuned for PyTorch on CPU
(``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``): with the defaults, allocations above
the dynamic mmap threshold (128 KiB, growing to at most 32 MiB) are mmap'ed and unmapped again and
freed heap is trimmed back to the OS, so each forward pays fresh page faults for its activations;
CPU inference is 30-60% slower and much noisier. ``--stock-malloc``
keeps (or restores) the stock allocator to report that figure as well.

Timing is interleaved: every round runs each case once (more calls if one call is short), in a
fresh random order, so a load spike from another process hits all cases of that round alike.
Ratios are *paired*: the median over rounds of ``t_reference / t_case`` measured in the same round.
An A/A case (the same model built twice) shows the noise floor of a run.
"""

from __future__ import annotations

import os
import sys

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
_REEXEC_FLAG = "EFFBACKBONE_BENCH_REEXEC"


def ensure_malloc_env() -> None:
    """Re-exec this process with :data:`MALLOC_ENV` set (or unset with ``--stock-malloc``)."""
    stock = "--stock-malloc" in sys.argv
    want = {} if stock else MALLOC_ENV
    have = {k: os.environ.get(k) for k in MALLOC_ENV}
    if all(have[k] == want.get(k) for k in MALLOC_ENV) or os.environ.get(_REEXEC_FLAG):
        return
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    env.update(want)
    env[_REEXEC_FLAG] = "1"
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


ensure_malloc_env()

# ruff: noqa: E402  (torch must be imported after the re-exec above)
import argparse
import json
import math
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark takes."""
    parser.add_argument("--quick", action="store_true", help="fewer rounds / sizes (development check)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 5 quick, 15 full)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per case before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--min-sample-s", type=float, default=0.05, help="repeat short calls up to this per sample")
    parser.add_argument("--stock-malloc", action="store_true", help="keep glibc's default malloc settings")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/<name>.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-repeats", type=int, default=None, help="children per RSS figure (min; 1 quick, 3 full)")


_LOAD_START: tuple[float, float, float] | None = None


def setup(args: argparse.Namespace) -> None:
    """Threads, seeds and default rounds; records the load average at the start."""
    global _LOAD_START
    _LOAD_START = os.getloadavg()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.rounds is None:
        args.rounds = 5 if args.quick else 15
    if args.rss_repeats is None:
        args.rss_repeats = 1 if args.quick else 3


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "malloc": "stock" if "MALLOC_MMAP_THRESHOLD_" not in os.environ else MALLOC_ENV,
        "loadavg_start": _LOAD_START,
        "git_commit": commit,
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# -- timing -----------------------------------------------------------------------------------
@dataclass
class Case:
    """One thing to time.

    Attributes:
        name: Row label (unique within a group).
        fn: A call with no arguments; its result is discarded.
        items: Images processed per call (for images/s).
        meta: Anything to copy into the JSON row.
        times: Seconds per call, one entry per round (filled by :func:`run_interleaved`).
    """

    name: str
    fn: Callable[[], Any]
    items: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    inner: int = 1


def _calibrate(case: Case, warmup: int, min_sample_s: float) -> None:
    t = math.inf
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        case.fn()
        t = min(t, time.perf_counter() - t0)
    case.inner = max(1, math.ceil(min_sample_s / max(t, 1e-6)))


def run_interleaved(cases: list[Case], rounds: int, warmup: int = 2, min_sample_s: float = 0.05) -> None:
    """Time every case once per round, in a new random order each round (fills ``case.times``)."""
    for case in cases:
        _calibrate(case, warmup, min_sample_s)
    order = list(range(len(cases)))
    for _ in range(rounds):
        random.shuffle(order)
        for i in order:
            case = cases[i]
            t0 = time.perf_counter()
            for _ in range(case.inner):
                case.fn()
            case.times.append((time.perf_counter() - t0) / case.inner)


def quantiles(values: Iterable[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    v = sorted(values)
    if len(v) == 1:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[1], q[2]


def paired_ratio(ref: Case, case: Case) -> tuple[float, float, float]:
    """Quartiles over rounds of ``t_ref / t_case`` (> 1: ``case`` is faster than ``ref``)."""
    return quantiles(r / c for r, c in zip(ref.times, case.times, strict=True))


def summarize(cases: list[Case], reference: str) -> list[dict[str, Any]]:
    """JSON rows: median time, IQR, images/s, and the paired ratio against ``reference``."""
    ref = next(c for c in cases if c.name == reference)
    rows = []
    for c in cases:
        q1, med, q3 = quantiles(c.times)
        r1, rmed, r3 = paired_ratio(ref, c)
        rows.append({
            "name": c.name, "median_s": med, "q1_s": q1, "q3_s": q3, "min_s": min(c.times),
            "items_per_s": c.items / med, "speedup_vs_ref": rmed, "speedup_q1": r1, "speedup_q3": r3,
            "reference": reference, "rounds": len(c.times), "inner": c.inner, "times_s": c.times, **c.meta,
        })
    return rows


def print_table(title: str, rows: list[dict[str, Any]], unit: str = "img/s") -> None:
    """Median throughput and paired speed-up vs the reference, with the interquartile range."""
    ref = rows[0]["reference"]
    print(f"\n== {title}\n   speed-up = median over rounds of t[{ref}] / t[row] (paired), with its interquartile range")
    width = max(len(r["name"]) for r in rows) + 2
    print(f"{'case':<{width}}{unit:>10}{'median ms':>11}{'IQR ms':>16}{'min ms':>9}{'speed-up':>10}{'IQR':>12}")
    for r in rows:
        iqr = f"{r['q1_s'] * 1e3:.1f}-{r['q3_s'] * 1e3:.1f}"
        riqr = f"{r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}"
        print(
            f"{r['name']:<{width}}{r['items_per_s']:>10.2f}{r['median_s'] * 1e3:>11.1f}{iqr:>16}"
            f"{r['min_s'] * 1e3:>9.1f}{r['speedup_vs_ref']:>10.2f}{riqr:>12}"
        )


def write_json(name: str, args: argparse.Namespace, payload: dict[str, Any]) -> Path:
    """Write ``payload`` plus machine info to ``benchmarks/results/<name>[-quick][-stock].json``."""
    suffix = ("-quick" if args.quick else "") + ("-stock" if args.stock_malloc else "")
    path = args.out or RESULTS / f"{name}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info["loadavg_end"] = os.getloadavg()
    path.write_text(json.dumps({"machine": info, "args": _jsonable(vars(args)), **payload}, indent=1))
    print(f"\nwrote {path}")
    return path


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


# -- memory -----------------------------------------------------------------------------------
def _is_param_storage(t: torch.Tensor, params: set[int]) -> bool:
    base = t._base if t._base is not None else t
    return isinstance(t, torch.nn.Parameter) or isinstance(base, torch.nn.Parameter) or id(base) in params


def saved_tensor_bytes(fn: Callable[[], Any], params: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """Bytes autograd saves for backward while ``fn()`` runs (parameters excluded), and its result.

    Each storage is counted once, however many ops save it. This is the activation memory a
    training step holds at its peak (just before backward), without allocator slack,
    temporaries or gradients. It is exact and device-independent, and works on the ``meta``
    device (shapes only), so it can be evaluated at any resolution for free. Tensors saved
    inside ``torch.utils.checkpoint`` regions are not seen (``bench_memory.py`` accounts for them).
    """
    param_ids = {id(p) for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not _is_param_storage(t, param_ids):
            storage = t.untyped_storage()
            # Meta tensors all report data_ptr 0: fall back to the storage's base tensor identity.
            key = storage.data_ptr() if t.device.type != "meta" else id(t._base if t._base is not None else t)
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def tracked_peak(step: Callable[[], Any], model: torch.nn.Module, optimizer: Any = None) -> dict[str, int] | None:
    """Peak live tensor bytes during one call of ``step``, by category, or ``None`` if unavailable.

    Uses torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``), which follows every
    tensor's storage through a dispatch mode: parameters, buffers, gradients, optimizer states,
    activations and temporaries at the moment of the peak. It counts tensors, not allocator
    blocks, so it is deterministic and works on CPU and on the ``meta`` device (shapes only: any
    variant, resolution and batch for free); cuDNN workspaces and allocator slack come on top.
    Call ``step`` once before (optimizer state allocated): the tracker handles one iteration.
    """
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # a private module; it may move between torch versions
        return None
    tracker = MemTracker()
    tracker.track_external(model, *([optimizer] if optimizer is not None else []))
    with tracker:
        step()
    snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {(k if isinstance(k, str) else k.name).lower(): int(v) for k, v in snap.items()}


# Prepended to child programs: reset the peak-RSS counter, then read current and peak RSS (KiB).
CHILD_PRELUDE = r"""
import json, resource, torch
def _reset_peak():
    import ctypes, gc
    gc.collect()
    try:  # hand free heap pages back, so that reusing them during the step shows up in RSS again
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux >= 4.0: writing 5 resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
def _prime_optimizer(opt):
    # Allocate the optimizer state (and gradient-sized blocks) with zero gradients and lr 0, so the
    # measured step's growth is its activations and temporaries. A real first step would leave its
    # freed activations resident in the heap and hide the next step's peak.
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
def _kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""


def peak_rss_growth_mib(code: str, repeats: int = 1, timeout: float = 600.0) -> float:
    """Run :data:`CHILD_PRELUDE` + ``code`` in fresh interpreters; the smallest peak-RSS growth (MiB).

    The child calls ``_reset_peak()`` just before the measured work: it returns free heap pages
    to the OS (``malloc_trim``), so memory freed while building the model is not silently reused,
    and resets the peak counter, so the import and build peaks do not mask the step. The child
    prints ``{"base_kib": _kib("VmRSS"), "peak_kib": _kib("VmHWM")}`` as its last line. With
    :data:`MALLOC_ENV` (no mmap, no trim) memory freed during the step stays in the heap, so the
    peak is that of live allocations plus allocator fragmentation. The fragmentation varies by a
    few percent from run to run and only ever adds, hence the minimum over ``repeats`` children.
    """
    # The child inherits this process's malloc settings and must not re-exec itself.
    env = {**os.environ, "PYTHONPATH": str(ROOT), _REEXEC_FLAG: "1"}
    growth = math.inf
    for _ in range(repeats):
        res = subprocess.run(
            [sys.executable, "-c", CHILD_PRELUDE + code], capture_output=True, text=True, env=env, timeout=timeout
        )
        if res.returncode != 0:
            raise RuntimeError(f"child failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        growth = min(growth, (r["peak_kib"] - r["base_kib"]) / 1024)
    return growth


def importable(module: str) -> bool:
    """Whether ``module`` imports (optional peers and integrations are skipped when not)."""
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "skip this part"
        print(f"[skip] {module} is not importable: {type(e).__name__}: {e}")
        return False
    return True
