"""MetaDistil at scale: a meta-learned teacher, ZeRO-sharded models, fused kernels."""

__version__ = "0.1.0"
