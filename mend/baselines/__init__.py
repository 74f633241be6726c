"""The seed baselines that are not prefix methods, each in its own folder: pattern-based ICL,
fine-tuning and context distillation on NLI (:mod:`~mend.baselines.nli`), and distilling
step-by-step (:mod:`~mend.baselines.step_by_step`)."""
