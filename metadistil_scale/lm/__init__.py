"""Causal-LM distillation: token-level KD and MetaDistil at vocabulary scale (logits kept in row chunks)."""
