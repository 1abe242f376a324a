"""Our `kernels` import package against Hugging Face's `kernels` distribution.

Why: transformers 5.25 made Hugging Face's `kernels` a hard dependency. Its top-level module is also
`kernels`, and once its distribution is installed, transformers' `PreTrainedModel` import runs
`from kernels import CUDAProperties, ...` and gets ours, so importing the model failed (fresh-clone CI
of 2026-12-03). pyproject.toml keeps transformers below 5.25; these tests fail first, with the
reason, if an install brings the other package back.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import kernels

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_is_our_package() -> None:
    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"
    assert callable(kernels.chunk_gla_prefill) and callable(kernels.fused_recurrent_gla_decode)


def test_hugging_face_kernels_distribution_is_not_installed() -> None:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    raise AssertionError(
        f"Hugging Face's `kernels` {dist.version} is installed; its module collides with ours (gla-serve's "
        "`kernels`). It comes with transformers >= 5.25: keep transformers < 5.25 (pyproject.toml)."
    )


def test_transformers_model_classes_import() -> None:
    from transformers import PreTrainedModel
    from transformers.utils import import_utils

    assert PreTrainedModel is not None
    check = getattr(import_utils, "is_kernels_available", None)
    assert check is None or not check()
