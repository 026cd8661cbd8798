"""MetaDistil at scale: a meta-learned teacher, ZeRO-sharded models, fused kernels."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# kernels/ and launch/ sit beside this package in a source tree and install as metadistil_scale.kernels and
# metadistil_scale.launch. Where the tree itself is imported (a Ray job's working_dir on nodes that have only the
# dependencies installed), let the same names resolve to the folders beside it.
_root = _Path(__file__).resolve().parent.parent
if (_root / "launch" / "__init__.py").is_file() and (_root / "kernels" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821 (a package's __path__)
