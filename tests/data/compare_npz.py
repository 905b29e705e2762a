"""Compare two .npz files key by key: the check that a generator reproduces a committed fixture.

    python tests/data/compare_npz.py NEW.npz COMMITTED.npz

Prints every key that differs (missing, dtype, shape, or values with the max abs difference) and a
summary; exits 1 unless both files hold the same keys with bit-identical arrays.
"""

from __future__ import annotations

import sys

import numpy as np


def compare(new_path: str, old_path: str) -> bool:
    """Print the differences between two npz files; True when every array is bit-identical."""
    new, old = np.load(new_path), np.load(old_path)
    identical = True
    for key in sorted(set(new.files) - set(old.files)):
        print(f"only in {new_path}: {key}")
        identical = False
    for key in sorted(set(old.files) - set(new.files)):
        print(f"only in {old_path}: {key}")
        identical = False
    for key in [k for k in old.files if k in new.files]:
        a, b = new[key], old[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            print(f"{key}: dtype/shape {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
            identical = False
        elif a.tobytes() != b.tobytes():
            # Bytes, not ==, so NaN == NaN and -0.0 != 0.0 count as written.
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).max() \
                if a.dtype.kind in "fiub" else "n/a"
            print(f"{key}: values differ, max abs diff {diff}")
            identical = False
    common = len(set(new.files) & set(old.files))
    print(f"{common} common keys; {'all bit-identical' if identical else 'DIFFERENCES above'}")
    return identical


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(0 if compare(sys.argv[1], sys.argv[2]) else 1)
