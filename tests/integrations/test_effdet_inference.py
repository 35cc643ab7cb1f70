"""Fast EfficientDet inference: exact top-k pre-filter, BN folding in the BiFPN, channels_last."""

from __future__ import annotations

import pytest
import torch

effdet = pytest.importorskip("effdet")

from effdet.bench import _post_process  # noqa: E402

from effbackbone.integrations.effdet import create_efficientdet  # noqa: E402
from effbackbone.integrations.effdet_inference import (  # noqa: E402
    FastDetBenchPredict,
    optimize_efficientdet_for_inference,
    post_process,
)

SIZES = (32, 16, 8, 4, 2)  # D0 head maps at 256 px


def _distinct_outputs(
    batch: int, classes: int, sizes: tuple[int, ...], fmt: torch.memory_format, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Head outputs whose logits are all different (a shuffled range), so top-k has no ties to break."""
    g = torch.Generator().manual_seed(seed)
    numel = [batch * 9 * classes * s * s for s in sizes]
    values = torch.randperm(sum(numel), generator=g).float().div_(sum(numel)).sub_(0.5).mul_(12)
    parts = zip(values.split(numel), sizes, strict=True)
    cls = [v.view(batch, 9 * classes, s, s).contiguous(memory_format=fmt) for v, s in parts]
    box = [torch.randn(batch, 9 * 4, s, s, generator=g).contiguous(memory_format=fmt) for s in sizes]
    return cls, box


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(("classes", "k"), [(90, 1000), (3, 5000), (1, 64)])
def test_post_process_equals_effdet(fmt, classes, k):
    # (3, 5000): k exceeds the 12k anchors' count only for classes; (1, 64): one class.
    cls, box = _distinct_outputs(2, classes, SIZES, fmt)
    ours = post_process(cls, box, len(SIZES), classes, k)
    ref = _post_process(cls, box, len(SIZES), classes, k)
    for name, a, b in zip(("logits", "boxes", "anchors", "classes"), ours, ref, strict=True):
        assert a.shape == b.shape, name
        assert torch.equal(a, b), name


def test_post_process_with_ties_selects_the_same_values():
    # Random-init heads produce many exactly equal logits; which of the tied pairs is kept is
    # arbitrary in any top-k, but the kept values must be the same multiset.
    g = torch.Generator().manual_seed(3)
    cls = [torch.randint(0, 40, (1, 9 * 5, s, s), generator=g).float() for s in SIZES]
    box = [torch.randn(1, 36, s, s, generator=g) for s in SIZES]
    ours, ref = post_process(cls, box, 5, 5, 800), _post_process(cls, box, 5, 5, 800)
    assert torch.equal(ours[0], ref[0])
    flat = torch.cat([c.permute(0, 2, 3, 1).reshape(1, -1, 5) for c in cls], 1)
    picked = flat[0, ours[2][0], ours[3][0]]  # our anchor/class indices point at our values
    assert torch.equal(picked, ours[0][0, :, 0])


def _calibrated_d0(size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    det = create_efficientdet("d0", num_classes=4, image_size=size)
    with torch.no_grad():  # effdet's head init gives near-constant logits; spread them so none tie
        for m in det.class_net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.3)
        det.train()
        det(torch.randn(2, 3, size, size))  # BN statistics that are not the identity
    return det.eval()


def test_fast_predictor_matches_det_bench_predict():
    det = _calibrated_d0(256)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in det.modules())
    x = torch.randn(2, 3, 256, 256)
    with torch.inference_mode():
        ref = effdet.DetBenchPredict(det).eval()(x)
        post_only = FastDetBenchPredict(det).eval()(x)
        fast_bench = optimize_efficientdet_for_inference(effdet.DetBenchPredict(det))
        fast = fast_bench(x)
    assert torch.equal(post_only, ref)
    # Folded BN changes the float rounding only: same detections in the same order.
    assert fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, atol=2e-3, rtol=1e-4)
    # The BiFPN and encoder BNs are folded; the heads' per-level BNs (after shared convs) stay.
    remaining = [n for n, m in fast_bench.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert remaining and all(n.startswith(("model.class_net.bn_rep", "model.box_net.bn_rep")) for n in remaining)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in det.modules()) == n_bn  # the input is not changed


def test_optimize_rejects_other_models():
    with pytest.raises(TypeError, match="EfficientDet"):
        optimize_efficientdet_for_inference(torch.nn.Conv2d(3, 3, 1))
