"""weightavg.core.kernels: the foreach path agrees with the per-tensor loop and with float64 closed forms."""

from __future__ import annotations

import pytest
import torch

from weightavg.core import kernels

SHAPES = ((3,), (4, 5), (2, 3, 4), (), (0,))
# (target dtype, source dtype): same dtype, and the fp32-average-of-low-precision-weights case.
DTYPE_PAIRS = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float64, torch.float32),
]


def tensors(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in SHAPES]


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    eps = torch.finfo(dtype).eps
    return {"rtol": 4 * eps, "atol": 4 * eps}


@pytest.mark.parametrize(("target_dtype", "source_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("weight", [0.0, 1e-3, 0.3, 0.5, 0.999])
def test_lerp_foreach_matches_loop_and_float64(
    target_dtype: torch.dtype, source_dtype: torch.dtype, weight: float
) -> None:
    targets, sources = tensors(target_dtype, seed=0), tensors(source_dtype, seed=1)
    sources_before = [s.clone() for s in sources]
    by_foreach = [t.clone() for t in targets]
    by_loop = [t.clone() for t in targets]

    kernels.lerp_(by_foreach, sources, weight, foreach=True)
    kernels.lerp_(by_loop, sources, weight, foreach=False)

    for fast, slow, target, source, before in zip(by_foreach, by_loop, targets, sources, sources_before, strict=True):
        assert fast.dtype == slow.dtype == target_dtype
        torch.testing.assert_close(fast, slow, rtol=0, atol=0)
        exact = target.double() + weight * (source.double() - target.double())
        torch.testing.assert_close(fast.double(), exact, **tolerance(target_dtype))
        assert torch.equal(source, before), "sources must not be modified"


@pytest.mark.parametrize(("target_dtype", "source_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("foreach", [True, False])
def test_lerp_weight_one_is_an_exact_copy(target_dtype: torch.dtype, source_dtype: torch.dtype, foreach: bool) -> None:
    # Garbage in the targets (as in never-initialised memory): ``t + 1 * (s - t)`` would keep a NaN or inf.
    targets = [t * 1e6 for t in tensors(target_dtype, seed=2)]
    targets[1][0, 0], targets[1][1, 1], targets[2][0, 0, 0] = float("nan"), float("inf"), -float("inf")
    sources = [s * 1e-3 for s in tensors(source_dtype, seed=3)]
    kernels.lerp_(targets, sources, 1.0, foreach=foreach)
    for target, source in zip(targets, sources, strict=True):
        assert target.dtype == target_dtype
        assert torch.equal(target, source.to(target_dtype))


@pytest.mark.parametrize(("target_dtype", "source_dtype"), DTYPE_PAIRS)
def test_copy_foreach_matches_loop(target_dtype: torch.dtype, source_dtype: torch.dtype) -> None:
    sources = tensors(source_dtype, seed=4)
    by_foreach, by_loop = tensors(target_dtype, seed=5), tensors(target_dtype, seed=5)
    kernels.copy_(by_foreach, sources, foreach=True)
    kernels.copy_(by_loop, sources, foreach=False)
    for fast, slow, source in zip(by_foreach, by_loop, sources, strict=True):
        assert torch.equal(fast, slow)
        assert torch.equal(fast, source.to(target_dtype))


def test_repeated_lerp_matches_float64_recurrence() -> None:
    """Many small-weight updates (an EMA) through both paths stay on the float64 recurrence."""
    generator = torch.Generator().manual_seed(6)
    live = [torch.randn(50, generator=generator, dtype=torch.float64) for _ in range(3)]
    fast = [t.float() for t in live]
    slow = [t.float() for t in live]
    exact = [t.clone() for t in live]
    for _ in range(200):
        live = [t + 0.01 * torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in live]
        kernels.lerp_(fast, [t.float() for t in live], 0.01, foreach=True)
        kernels.lerp_(slow, [t.float() for t in live], 0.01, foreach=False)
        exact = [0.99 * e + 0.01 * t for e, t in zip(exact, live, strict=True)]
    for f, s, e in zip(fast, slow, exact, strict=True):
        assert torch.equal(f, s)
        torch.testing.assert_close(f.double(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [True, False])
def test_empty_lists_are_a_no_op(foreach: bool) -> None:
    kernels.lerp_([], [], 0.5, foreach=foreach)
    kernels.lerp_([], [], 1.0, foreach=foreach)
    kernels.copy_([], [], foreach=foreach)


MIXED_PAIRS = [pair for pair in DTYPE_PAIRS if pair[0] != pair[1]]


@pytest.mark.parametrize(("target_dtype", "source_dtype"), MIXED_PAIRS)
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("stage", [None, 7])
def test_mixed_dtype_lerp_is_torch_lerp_against_the_exact_upcast(
    target_dtype: torch.dtype,
    source_dtype: torch.dtype,
    foreach: bool,
    stage: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An fp32 average of bf16 weights is updated by a true ``lerp_`` in fp32 (the upcast is exact), bit for bit;
    ``stage=7`` makes the staging buffer smaller than most tensors, so they are split across batches."""
    if stage is not None:
        monkeypatch.setattr(kernels, "STAGE_ELEMENTS_CPU", stage)
    targets, sources = tensors(target_dtype, seed=7), tensors(source_dtype, seed=8)
    sources.append(torch.randn(6, 4, dtype=torch.float64).to(source_dtype).t())  # non-contiguous: staged whole
    targets.append(torch.randn(4, 6, dtype=torch.float64).to(target_dtype))
    expected = [t.clone().lerp_(s.to(target_dtype), 1e-3) for t, s in zip(targets, sources, strict=True)]
    kernels.lerp_(targets, sources, 1e-3, foreach=foreach)
    for target, exact in zip(targets, expected, strict=True):
        assert torch.equal(target, exact)


@pytest.mark.parametrize(("target_dtype", "source_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("weight", [1e-3, 0.7, 1.0])
def test_guarded_lerp_skips_on_the_device_and_otherwise_equals_lerp(
    target_dtype: torch.dtype, source_dtype: torch.dtype, weight: float
) -> None:
    """``enabled=False`` leaves the targets bit-identical even when the sources hold NaN and inf; ``enabled=True``
    is the unguarded kernel; foreach and loop agree."""
    sources = tensors(source_dtype, seed=9)
    sources[1][0, 0], sources[2][1, 1, 1] = float("nan"), float("inf")
    for flag in (False, True):
        results = []
        for foreach in (True, False):
            targets = tensors(target_dtype, seed=10)
            kernels.lerp_(targets, sources, weight, foreach=foreach, enabled=torch.tensor(flag))
            results.append(targets)
        unguarded = tensors(target_dtype, seed=10)
        if flag:
            kernels.lerp_(unguarded, sources, weight)
        for fast, slow, expected in zip(*results, unguarded, strict=True):
            torch.testing.assert_close(fast, slow, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(fast, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.7, -0.35])
def test_add_foreach_matches_loop_and_float64(dtype: torch.dtype, alpha: float) -> None:
    targets, sources = tensors(dtype, seed=10), tensors(dtype, seed=11)
    by_foreach, by_loop = [t.clone() for t in targets], [t.clone() for t in targets]
    kernels.add_(by_foreach, sources, alpha, foreach=True)
    kernels.add_(by_loop, sources, alpha, foreach=False)
    for fast, slow, target, source in zip(by_foreach, by_loop, targets, sources, strict=True):
        torch.testing.assert_close(fast, slow, rtol=0, atol=0)
        torch.testing.assert_close(fast.double(), target.double() + alpha * source.double(), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("factor", [0.5, 0.9, 3.0])
def test_mul_and_div_foreach_match_loop_and_float64(dtype: torch.dtype, factor: float) -> None:
    targets = tensors(dtype, seed=12)
    for kernel, exact in ((kernels.mul_, lambda t: t * factor), (kernels.div_, lambda t: t / factor)):
        by_foreach, by_loop = [t.clone() for t in targets], [t.clone() for t in targets]
        kernel(by_foreach, factor, foreach=True)
        kernel(by_loop, factor, foreach=False)
        for fast, slow, target in zip(by_foreach, by_loop, targets, strict=True):
            torch.testing.assert_close(fast, slow, rtol=0, atol=0)
            torch.testing.assert_close(fast.double(), exact(target.double()), **tolerance(dtype))
    # div_ is a true division (a mean over ranks rounds once), not a multiplication by the reciprocal.
    third = [torch.full((4,), 0.1 * 3, dtype=dtype)]
    kernels.div_(third, 3.0)
    assert torch.equal(third[0], torch.full((4,), 0.1 * 3, dtype=dtype) / 3)


@pytest.mark.parametrize("foreach", [True, False])
def test_zero_and_max_abs(foreach: bool) -> None:
    values = [t for t in tensors(torch.float64, seed=13) if t.numel()]
    values[1][0, 0] = -7.5
    norms = kernels.max_abs(values, foreach=foreach)
    assert [float(n) for n in norms] == [float(v.abs().max()) for v in values]
    values[0][0] = float("nan")
    assert torch.isnan(kernels.max_abs(values, foreach=foreach)[0])
    kernels.zero_(values, foreach=foreach)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in values)
    assert kernels.max_abs([], foreach=foreach) == []


def test_no_method_writes_its_own_foreach_arithmetic() -> None:
    """Weight arithmetic goes through weightavg.core.kernels (both paths, tested here), nowhere else."""
    from pathlib import Path

    import weightavg

    package = Path(weightavg.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{number}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "kernels.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if "_foreach_" in line
    ]
    assert offenders == []
