
import torch

from ntk_bench.bench.zoo import architectures


def model():
    torch.manual_seed(0)
    return architectures.tutorial_cnn()[0].eval()


def data():
    return torch.randn(512, 3, 32, 32, generator=torch.Generator().manual_seed(512))
