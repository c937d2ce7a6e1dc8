"""Kernel tests run on CUDA when there is a GPU, else in Triton's CPU interpreter (small shapes)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernels are defined
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        interpreter = None
    if interpreter is not None and hasattr(interpreter, "_patch_lang_tensor"):
        # Triton 3.6's interpreter turns loop bounds into ints with int(array), which numpy 2 refuses for
        # the 1-element arrays it holds scalars in; take the element instead.
        _patch = interpreter._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = _patch_lang_tensor


@pytest.fixture(scope="session")
def device() -> str:
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"
