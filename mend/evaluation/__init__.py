"""Scoring methods on tasks (:mod:`~mend.evaluation.harness`), the metrics, demonstration
retrieval, the efficiency measurements and the content controls (diagnostics)."""
