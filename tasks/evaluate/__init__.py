"""Evaluation tasks behind the `EvalTask` Protocol. ``registry`` imports no torch."""
