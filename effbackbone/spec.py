"""The backbone contract: what each output level is, as data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureSpec:
    """One pyramid level that the encoder can return.

    Attributes:
        name: ``"C1"`` ... ``"C5"``: level ``k`` has nominal stride ``2**k``.
        channels: Channels of the tensor.
        stride: Actual stride of the tensor w.r.t. the input (smaller than ``2**k`` for the
            dilated levels when ``output_stride`` < 32).
        index: Position among all levels (0 for C1 ... 4 for C5), timm's ``out_indices`` numbering.
        module: Name of the module whose output this is (``"blocks.6"`` = the last block of the
            last stage at that stride; the block's output after its residual add).
        stage: Index of that stage in the model's ``blocks`` (``module == f"blocks.{stage}"``); read
            this rather than parsing ``module``.
    """

    name: str
    channels: int
    stride: int
    index: int
    module: str
    stage: int
