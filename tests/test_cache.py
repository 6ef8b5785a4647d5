"""ActivationCache: round trips per mode, bf16 exactness on disk, indexing, temp-file lifetime."""

from __future__ import annotations

import pytest
import torch

from liftquant.quantize.cache import ActivationCache, batch_indices, choose_mode

SHAPE = (6, 5, 8)  # (N, L, H)


def _data(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(SHAPE, generator=gen) * 3).to(dtype)


@pytest.mark.parametrize("mode", ["cpu", "pinned", "disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_exact(mode: str, dtype: torch.dtype, tmp_path) -> None:
    data = _data(dtype)
    with ActivationCache(*SHAPE, dtype=dtype, mode=mode, path=tmp_path) as cache:
        for i in range(SHAPE[0]):
            cache[i] = data[i]
        assert len(cache) == SHAPE[0]
        assert cache.nbytes == data.numel() * data.element_size()
        out = cache[:]
        assert out.dtype == dtype and out.shape == SHAPE
        bits = torch.int32 if dtype == torch.float32 else torch.int16  # compare bit patterns
        assert torch.equal(out.view(bits), data.view(bits))


def test_bf16_disk_bits_exact(tmp_path) -> None:
    """Every bf16 bit pattern, including inf and negative zero, survives the int16 storage."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    every = bits.view(torch.bfloat16)  # all 65536 patterns: NaNs, infs, -0, subnormals
    data = every[: 4 * 4 * 4096].reshape(4, 4, 4096)
    with ActivationCache(4, 4, 4096, dtype=torch.bfloat16, mode="disk", path=tmp_path) as cache:
        cache[:] = data
        assert torch.equal(cache[:].view(torch.int16), data.view(torch.int16))


def test_slices_and_index_lists(tmp_path) -> None:
    data = _data(torch.float32)
    for mode in ("cpu", "disk"):
        with ActivationCache(*SHAPE, dtype=torch.float32, mode=mode, path=tmp_path) as cache:
            cache[0:4] = data[0:4]
            cache[[5, 4]] = data[[5, 4]]
            assert torch.equal(cache[1:3], data[1:3])
            assert torch.equal(cache[torch.tensor([4, 0])], data[[4, 0]])
            assert torch.equal(cache.get_batch([3, 1], "cpu"), data[[3, 1]])
            assert torch.equal(cache.get_batch(2), data[2:3])
            got = torch.cat(list(cache.iter_batches(4, device="cpu")))
            assert torch.equal(got, data)
            gen = torch.Generator().manual_seed(1)
            shuffled = list(cache.iter_batches(4, shuffle=True, generator=gen))
            assert [b.shape[0] for b in shuffled] == [4, 2]
            gen = torch.Generator().manual_seed(1)
            order = torch.cat(batch_indices(6, 4, shuffle=True, generator=gen))
            assert torch.equal(torch.cat(shuffled), data[order])


def test_reads_are_copies() -> None:
    data = _data(torch.float32)
    cache = ActivationCache(*SHAPE, dtype=torch.float32)
    cache[:] = data
    view = cache[0]
    view.zero_()
    assert torch.equal(cache[0], data[0])


def test_write_converts_dtype(tmp_path) -> None:
    data = _data(torch.float32)
    with ActivationCache(*SHAPE, dtype=torch.bfloat16, mode="disk", path=tmp_path) as cache:
        cache[:] = data
        assert torch.equal(cache[:], data.to(torch.bfloat16))


def test_temp_file_deleted_on_close(tmp_path) -> None:
    cache = ActivationCache(*SHAPE, dtype=torch.bfloat16, mode="disk", path=tmp_path)
    cache[0] = _data(torch.bfloat16)[0]
    file = cache.file
    assert file is not None and file.exists() and file.parent == tmp_path
    cache.close()
    assert not file.exists() and cache.closed
    cache.close()  # idempotent
    with pytest.raises(RuntimeError):
        cache[0]
    with ActivationCache(*SHAPE, mode="disk", path=tmp_path) as cache2:
        file2 = cache2.file
    assert not file2.exists()
    cache3 = ActivationCache(*SHAPE, mode="disk", path=tmp_path)
    file3 = cache3.file
    del cache3
    assert not file3.exists()
    assert list(tmp_path.iterdir()) == []


def test_estimate_and_choose_mode() -> None:
    assert (
        ActivationCache.estimate_bytes(4096, 2048, 5120, torch.bfloat16) == 4096 * 2048 * 5120 * 2
    )
    assert choose_mode(1) == "cpu"
    assert choose_mode(1, prefer="pinned") == "pinned"
    assert choose_mode(2**60) == "disk"


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        ActivationCache(*SHAPE, mode="gpu")
    with pytest.raises(ValueError):
        ActivationCache(*SHAPE, dtype=torch.int8)
    with pytest.raises(ValueError):
        ActivationCache(0, 5, 8)
