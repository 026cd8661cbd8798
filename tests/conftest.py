import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any module
# that defines Triton kernels is imported; on a machine without a GPU the interpreter is the only
# way Triton code runs at all.
os.environ.setdefault("TRITON_INTERPRET", "1")
