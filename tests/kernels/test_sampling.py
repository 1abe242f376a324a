"""The greedy sampling kernel (kernels/triton_sampling.py) against its PyTorch form in float64.

Small shapes run under TRITON_INTERPRET=1 on the CPU, the gpu-marked ones at the 1.3B vocabulary.
Ids must be exact (ties to the lowest id, as torch.argmax). Logprobs: the kernel reads the logits
in their dtype and computes in fp32 against a float64 reference of the same (rounded) logits,
|d| <= 1e-5 + 1e-5 |ref| (a 32K-term fp32 sum of exponentials, well inside that).
"""

from __future__ import annotations

import pytest
import torch

from kernels.sampling_torch import greedy_logprob_torch

triton = pytest.importorskip("triton")
from kernels.triton_sampling import BLOCK, greedy_logprob_triton  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def logits(B: int, V: int, dtype: torch.dtype, seed: int, scale: float = 4.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=DEV)


def check(x: torch.Tensor) -> None:
    out = greedy_logprob_triton(x)
    ref = greedy_logprob_torch(x.double())
    assert out.dtype == torch.float64 and out.shape == (x.shape[0], 2)
    assert torch.equal(out[:, 0], ref[:, 0]), f"ids {out[:, 0].tolist()} != {ref[:, 0].tolist()}"
    torch.testing.assert_close(out[:, 1], ref[:, 1], rtol=1e-5, atol=1e-5)


def _params(small: list[tuple], gpu: list[tuple]) -> list:  # type: ignore[type-arg]
    return [pytest.param(*c, id="-".join(map(str, c))) for c in small] + [
        pytest.param(*c, id="-".join(map(str, c)), marks=pytest.mark.gpu) for c in gpu]


SMALL = [(1, 1, "f32"), (3, 15, "f32"), (2, BLOCK - 1, "f32"), (2, BLOCK + 1, "f16"), (5, 5000, "f32")]
GPU = [(B, 32000, dt) for B in (1, 64, 256) for dt in ("f32", "bf16")]


@pytest.mark.parametrize("B,V,dt", _params(SMALL, GPU))
def test_greedy_matches_reference(B: int, V: int, dt: str, nan_poison: None) -> None:
    check(logits(B, V, DTYPES[dt], seed=B * 7 + V))


def test_ties_go_to_the_lowest_id_across_blocks() -> None:
    x = logits(3, 2 * BLOCK + 5, torch.float32, seed=1)
    x[0, 5] = x[0, BLOCK + 3] = 50.0  # the same maximum in two blocks
    x[1, BLOCK + 7] = x[1, BLOCK + 9] = 50.0  # twice in one block
    x[2, -1] = 60.0  # in the last, partial block
    check(x)
    assert greedy_logprob_triton(x)[:, 0].tolist() == [5, BLOCK + 7, 2 * BLOCK + 4]


def test_masked_vocabulary_tail_and_a_sharp_row() -> None:
    """Whole blocks of -inf logits (masked ids) must not give NaN, nor win the argmax."""
    x = logits(2, 3 * BLOCK, torch.float32, seed=2)
    x[:, BLOCK // 2:] = float("-inf")
    x[1, 3] = 1e4  # all the mass on one id: logprob 0
    check(x)
    assert greedy_logprob_triton(x)[1].tolist() == [3.0, 0.0]


def test_strided_rows() -> None:
    """A row slice of a wider tensor (the engine's logits of the real sequences of a padded graph)."""
    x = logits(4, 300, torch.float32, seed=3)[:, :257]
    check(x)
