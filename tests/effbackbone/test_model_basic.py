import pytest
import torch

import effbackbone


@pytest.mark.parametrize("name", ["b0", "lite0", "v2_s"])
def test_forward_matches_feature_specs(name):
    model = effbackbone.create_model(name).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
    assert list(out) == [s.name for s in model.feature_specs]
    for spec, t in zip(model.feature_specs, out.values(), strict=True):
        assert t.shape == (1, spec.channels, 64 // spec.stride, 96 // spec.stride)
