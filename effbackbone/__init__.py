"""effbackbone: EfficientNet feature-pyramid encoders for dense prediction.

``import effbackbone`` registers nothing in other frameworks; import
``effbackbone.integrations.<framework>`` for that.
"""

from effbackbone.arch import FAMILIES, VARIANTS, Family, StageSpec, Variant
from effbackbone.factory import create_model, list_models, resolve_variant
from effbackbone.hub import WeightsUnavailableError, lite_weights_path, resolve_weights
from effbackbone.model import EfficientNet, ModelConfig
from effbackbone.spec import FeatureSpec
from effbackbone.weights import WeightsError, load_weights, read_state_dict

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "VARIANTS",
    "EfficientNet",
    "Family",
    "FeatureSpec",
    "ModelConfig",
    "StageSpec",
    "Variant",
    "WeightsError",
    "WeightsUnavailableError",
    "__version__",
    "create_model",
    "lite_weights_path",
    "list_models",
    "load_weights",
    "read_state_dict",
    "resolve_variant",
    "resolve_weights",
]
