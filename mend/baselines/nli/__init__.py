"""NLI under patterns (Mosbach et al., 2023): pattern-based ICL, pattern-based fine-tuning
(full, LoRA, BitFit) and context distillation, scored in- and out-of-domain (HANS), with their
memory and time against k. Run with ``mend nli``."""
