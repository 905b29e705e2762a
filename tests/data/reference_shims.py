"""Shims the fixture generators share to run reference code on the CPU (not used by the tests)."""

from __future__ import annotations


def triton_single_autotune_config() -> None:
    """Keep only the last of each `triton.autotune` config list.

    Under `TRITON_INTERPRET=1` Triton runs the reference kernels unchanged on the CPU, but there is
    no GPU to benchmark the configs on; a config picks tile sizes, it does not change the result.
    Call before the reference's kernels are defined (before importing the reference).
    """
    import triton

    autotune = triton.autotune
    triton.autotune = lambda configs, **kwargs: autotune(configs=configs[-1:], **kwargs)
