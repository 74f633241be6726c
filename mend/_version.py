"""mend's version: one place, read by the package, its checkpoints and setup.cfg."""

__version__ = "0.1.0"
