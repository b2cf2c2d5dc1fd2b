"""Stage 8: the supporters under test, the judges, metrics, baselines, fidelity checks and the report."""
