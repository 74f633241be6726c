"""mend: distill in-context demonstrations into a few vectors for a frozen LLM (MEND).

Public API::

    from mend import Distiller, MendConfig
    distiller = Distiller.from_config(MendConfig(distiller="smollm2-135m", llm="smollm2-135m"))
    ctx = distiller.compress([("great movie!", "positive"), ("dull plot", "negative")])
    distiller.score(ctx, ["a joyless film"], options=["positive", "negative"])
"""

from mend._version import __version__
from mend.config import MendConfig, load_config
from mend.core.distiller import DistilledContext, Distiller
from mend.core.prefix_lm import PrefixLM
from mend.errors import (
    BackboneError, CheckpointError, ConfigError, InputError, MendError, TruncationWarning)

__all__ = [
    "__version__", "BackboneError", "CheckpointError", "ConfigError", "DistilledContext",
    "Distiller", "InputError", "MendConfig", "MendError", "PrefixLM", "TruncationWarning",
    "load_config",
]
