"""Evaluation: held-out loss on our own data, lm-eval benchmarks, and the results store."""
