"""mend: distill in-context demonstrations into a few vectors for a frozen LLM (MEND).

Public API::

    from mend import Distiller, MendConfig
    distiller = Distiller.from_config(MendConfig(distiller="smollm2-135m", llm="smollm2-135m"))
    ctx = distiller.compress([("great movie!", "positive"), ("dull plot", "negative")])
    distiller.score(ctx, ["a joyless film"], options=["positive", "negative"])
"""

__version__ = "0.1.0"

from mend.config import MendConfig, load_config  # noqa: E402
from mend.core.distiller import DistilledContext, Distiller  # noqa: E402
from mend.errors import (  # noqa: E402
    BackboneError, CheckpointError, ConfigError, InputError, MendError, TruncationWarning)
from mend.core.prefix_lm import PrefixLM  # noqa: E402

__all__ = [
    "BackboneError", "CheckpointError", "ConfigError", "DistilledContext", "Distiller",
    "InputError", "MendConfig", "MendError", "PrefixLM", "TruncationWarning", "load_config",
]
