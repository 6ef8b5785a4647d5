import pytest
import torch

from liftquant.core.pack import pack_signs, packed_width, unpack_signs


@pytest.mark.parametrize("shape", [(1, 8), (3, 13), (5, 1), (2, 3, 17), (4, 64), (7, 0)])
def test_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    signs = torch.randint(0, 2, shape, generator=g) * 2 - 1
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], packed_width(shape[-1]))
    assert torch.equal(unpack_signs(packed, shape[-1], dtype=torch.int64), signs)


def test_layout_is_lsb_first_along_last_dim():
    signs = torch.tensor([[1, -1, -1, -1, -1, -1, -1, -1, -1, 1]])  # bits 0 and 9 set
    packed = pack_signs(signs)
    assert packed.tolist() == [[0b00000001, 0b00000010]]
    assert torch.equal(pack_signs(signs > 0), packed)  # bool input: True = +1


def test_unpack_rejects_bad_input():
    with pytest.raises(TypeError):
        unpack_signs(torch.zeros(2, 2, dtype=torch.int32), 16)
    with pytest.raises(ValueError):
        unpack_signs(torch.zeros(2, 2, dtype=torch.uint8), 17)
