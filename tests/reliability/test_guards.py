import pytest
import torch

pytest.importorskip("lightning")

from tasks.common.guards import NonFiniteLossError, check_loss


def test_finite_loss_passes():
    loss = torch.tensor(1.5)
    assert check_loss(loss, 3, "raise") is loss


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "infinite")])
def test_nonfinite_raises_naming_step(value, kind):
    with pytest.raises(NonFiniteLossError, match=f"{kind}.*step 17"):
        check_loss(torch.tensor(value), 17, "raise")


def test_nonfinite_skip_returns_none():
    assert check_loss(torch.tensor(float("nan")), 0, "skip") is None
