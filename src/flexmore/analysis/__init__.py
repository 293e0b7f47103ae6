"""Accounting and analysis: parameters, FLOPs, rank sensitivity."""
