"""Model classes; they call :mod:`perceiver_fast.kernels` only and know nothing of backends."""
