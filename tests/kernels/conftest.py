"""Kernel tests run Triton in its CPU interpreter: the variable must be set before any kernel
module (which applies ``triton.jit``) is imported, so it is set here, at collection."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
