"""mend: distill in-context demonstrations into a few vectors for a frozen LLM (MEND).

Public API::

    from mend import Distiller, MendConfig
    distiller = Distiller.from_config(MendConfig(distiller="smollm2-135m", llm="smollm2-135m"))
    ctx = distiller.compress([("great movie!", "positive"), ("dull plot", "negative")])
    distiller.score(ctx, ["a joyless film"], options=["positive", "negative"])
"""

import logging

# bitsandbytes, imported with peft, warns at import that an optional 4-bit CPU kernel is
# missing; mend runs no 4-bit matmul, so the note is noise to its users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from mend._version import __version__  # noqa: E402
from mend.config import load_config  # noqa: E402
from mend.core.config import MendConfig  # noqa: E402
from mend.core.distiller import DistilledContext, Distiller  # noqa: E402
from mend.core.prefix_lm import PrefixLM  # noqa: E402
from mend.errors import (  # noqa: E402
    BackboneError,
    CheckpointError,
    ConfigError,
    InputError,
    MendError,
    TruncationWarning,
)

__all__ = [
    "__version__", "BackboneError", "CheckpointError", "ConfigError", "DistilledContext",
    "Distiller", "InputError", "MendConfig", "MendError", "PrefixLM", "TruncationWarning",
    "load_config",
]
