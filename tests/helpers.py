"""The one numeric comparison of the test suite, in the style of torchtune's ``assert_expected``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_float64(value: Any) -> np.ndarray:
    """A float64 numpy array of a tensor, a pandas Series or DataFrame, a numpy array, a number or a
    (nested) sequence of these."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64).numpy()
    if hasattr(value, "to_numpy"):  # pandas Series / DataFrame / Index
        value = value.to_numpy()
    if isinstance(value, (list, tuple)):
        return np.array([_as_float64(item) for item in value], dtype=np.float64)
    return np.array(value, dtype=np.float64)  # a copy: contiguous, as torch needs (no negative strides)


def assert_expected(actual: Any, expected: Any, *, rtol: float | None = None, atol: float | None = None,
                    equal_nan: bool = False, msg: str | None = None) -> None:
    """Assert that ``actual`` is close to ``expected``: ``torch.testing.assert_close`` underneath.

    Passes where ``|actual - expected| <= atol + rtol * |expected|`` elementwise, the shapes are equal
    (no broadcasting) and, unless ``equal_nan``, neither side holds a NaN.

    - Both tensors: compared as they are, dtype and device included (``check_dtype=True``).
    - Otherwise (numpy arrays, numpy or Python numbers, pandas Series/DataFrames, sequences, or a
      tensor against one of these): both sides become float64 numpy arrays and are compared by value
      with ``check_dtype=False``, so 1 vs 1.0 or int64 vs float64 compare equal.

    Tolerances: with both ``rtol`` and ``atol`` None, torch's dtype-based defaults (float64:
    rtol=1e-7, atol=1e-7; float32: rtol=1.3e-6, atol=1e-5; bfloat16: rtol=1.6e-2, atol=1e-5; integer
    dtypes: exact). With only one of them given, the other is 0. With both 0 the comparison is exact.

    ``msg`` goes in front of torch's report (which says where and by how much the values differ).
    """
    if (rtol is None) != (atol is None):
        rtol, atol = rtol or 0.0, atol or 0.0
    report = None if msg is None else (lambda default: f"{msg}: {default}")
    if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=equal_nan, msg=report)
        return
    torch.testing.assert_close(_as_float64(actual), _as_float64(expected), rtol=rtol, atol=atol,
                               equal_nan=equal_nan, check_dtype=False, msg=report)
