"""Models and calibration data for the int8 tests (importable as `quantkit.<name>` by model._target_)."""

from __future__ import annotations


def outlier_net(scale: float = 1000.0):
    """A CNN whose first layer puts one channel ~`scale` times above the rest, and whose second layer
    scales it back down: fp32 is fine, but one int8 scale for the whole tensor (per-tensor activations)
    rounds every ordinary channel to zero, so naive int8 fails and only keeping conv2 in fp32 fixes it."""
    import torch
    from torch import nn

    class OutlierNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
            self.fc = nn.Linear(32, 10)
            with torch.no_grad():
                self.conv1.weight[0] *= scale
                self.conv2.weight[:, 0] /= scale

        def forward(self, x):
            h = self.conv1(x)
            h = torch.relu(self.conv2(h))
            h = torch.relu(self.conv3(h))
            return self.fc(h.mean((2, 3)))

    return OutlierNet()


def image_batches(count: int = 8, size: int = 64):
    """A user's calibration factory: yields image batches (seeded noise, distributed as validation's inputs)."""
    import torch

    gen = torch.Generator().manual_seed(7)
    for _ in range(count):
        yield torch.randn(1, 3, size, size, generator=gen)


def raising_batches():
    raise RuntimeError("the dataset server is down")


def constant_image(count: int = 1, value: float = 0.5):
    """A deliberately broken calibration set: one constant 8x8 image (no real activation range)."""
    import torch

    for _ in range(count):
        yield torch.full((1, 1, 8, 8), value)


def tiny_linear():
    """One 64 -> 10 matrix product: too small for int8 to gain (quantize/dequantize cost more than it saves)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))


def margin(outputs, labels):
    """A user's metric by data.metric: mean top logit minus the runner-up (higher is more confident)."""
    top2 = outputs.topk(2, dim=-1).values
    return {"margin": float((top2[:, 0] - top2[:, 1]).mean())}
