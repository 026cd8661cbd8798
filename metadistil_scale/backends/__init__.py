"""Execution backends: plain torch and DeepSpeed."""
