"""Results files and their tables: provenance and per-run tables (:mod:`~mend.reporting.results`),
the content-controls table, and the paper's report."""
