"""mobilellm: train, evaluate and ship MobileLLM-style sub-billion-parameter language models."""

__version__ = "0.1.0"

from mobilellm.config import ModelConfig, get_preset, list_presets  # noqa: E402
from mobilellm.errors import MobileLLMError  # noqa: E402

__all__ = ["ModelConfig", "MobileLLMError", "get_preset", "list_presets", "__version__"]
