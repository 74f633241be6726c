"""Distilling step-by-step (Hsieh et al., 2023): a student trained on labels and rationales
(from a file or a teacher LLM). Run with ``mend sbs``."""
