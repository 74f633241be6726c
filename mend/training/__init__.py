"""The one training loop every trainable method runs (:func:`mend.training.loop.train`), with
its resumable checkpoints, run log and mixed-precision choice."""
