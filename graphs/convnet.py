"""`convnet`: ResNet-style residual blocks (conv, batchnorm, relu), NCHW, eval."""
import torch
from torch import nn

from .sample import Sample

PRESETS = {"tiny": dict(batch=2, size=16, widths=(8, 16), blocks=1, classes=10),
           "bench": dict(batch=8, size=112, widths=(32, 64, 128, 256), blocks=2, classes=100)}


def conv_bn(cin, cout, k, stride):
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():  # non-trivial statistics, so that folding them is tested
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.1, 0.1)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), bn)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.a, self.b = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, 1)
        self.short = conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.b(self.relu(self.a(x))) + self.short(x))


class ConvNet(nn.Module):
    def __init__(self, widths, blocks, classes):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, widths[0], 3, 2), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def build(preset, dtype, device):
    p = PRESETS[preset]
    torch.manual_seed(0)
    m = ConvNet(p["widths"], p["blocks"], p["classes"]).eval().to(device, dtype)
    x = torch.randn(p["batch"], 3, p["size"], p["size"], device=device, dtype=dtype)
    return Sample("convnet", m, (x,), unit="images", units_per_forward=p["batch"], dtype=dtype,
                  device=device, preset=preset,
                  description=f"ResNet-style, widths {p['widths']}, {p['blocks']} blocks/stage, "
                              f"B{p['batch']} 3x{p['size']}x{p['size']}")
