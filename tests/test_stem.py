"""The exact stem (`vaqkd.deploy.stem`) on convs unlike the ResNet stem: strides, dilation, a bias, BatchNorm
channels with γ < 0 and γ = 0, one input channel, other image sizes; the plain conv where the weights do not split
(groups); what it refuses."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import stem_error
from vaqkd.deploy.artifact import ExportError
from vaqkd.deploy.stem import ExactStem, split_exact

MEAN3, STD3 = np.array([129.3, 124.1, 112.4], np.float32), np.array([68.2, 65.4, 70.4], np.float32)


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c).eval()
    bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.2)
    bn.weight.data.copy_(torch.randn(c, generator=g))  # both signs
    bn.weight.data[0] = 0.0  # a channel training switched off: its output is the shift alone
    bn.bias.data.copy_(torch.randn(c, generator=g) * 0.5)
    return bn


@pytest.mark.parametrize("c_in,kwargs,size", [
    (3, dict(kernel_size=3, padding=1), (32, 32)),
    (3, dict(kernel_size=3, stride=2, padding=1, bias=True), (32, 32)),
    (3, dict(kernel_size=3, dilation=2, padding=2), (20, 24)),
    (1, dict(kernel_size=5, padding=2, bias=True), (17, 17)),
    (3, dict(kernel_size=1), (8, 8)),
])  # fmt: skip
def test_the_exact_stem_is_within_half_an_ulp_on_other_convs(c_in, kwargs, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, 16, **kwargs)
    bn = _bn(16, 1)
    norm = (MEAN3[:c_in], STD3[:c_in])
    x = torch.randint(0, 256, (8, c_in, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    stem = ExactStem(conv, bn, norm)
    assert stem.exact
    with torch.no_grad():
        got = stem(x)
        assert got.shape == conv(x.float()).shape
        assert stem_error(conv, bn, x, norm, got.numpy()) <= 0.75
        assert stem_error(conv, None, x, norm, ExactStem(conv, None, norm)(x).numpy()) <= 0.75  # no BatchNorm


def test_a_stem_the_split_cannot_take_runs_as_the_plain_conv_and_bad_input_is_refused():
    torch.manual_seed(0)
    grouped = nn.Conv2d(3, 6, 3, padding=1, groups=3)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    stem = ExactStem(grouped, None, (MEAN3, STD3))
    assert not stem.exact
    with torch.no_grad():
        m, s = (torch.from_numpy(a).view(1, 3, 1, 1) for a in (MEAN3, STD3))
        plain = grouped((x.float() - m) / s)
        assert torch.allclose(stem(x), plain, rtol=1e-5, atol=1e-5)
        with pytest.raises(ExportError, match="uint8 images"):
            stem(x.float())
    assert split_exact(np.ones((4, 4096, 3, 3))) is None  # a fan-in too wide for the high part to keep 4 bits
    with pytest.raises(ExportError, match="padding_mode='reflect'"):
        ExactStem(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), None, (MEAN3, STD3))
