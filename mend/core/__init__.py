"""The MEND model itself: its config (:mod:`~mend.core.config`), backbones and the offline
zoo, text layout, the distiller, the frozen LLM with a prefix (:mod:`~mend.core.prefix_lm`),
its KV prefix, losses and checkpoints."""
