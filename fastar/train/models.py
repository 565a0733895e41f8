"""Models: torchvision's ImageNet ResNets and a small CIFAR-style ResNet (He et al. 2016, sec. 4.2)
for runs that must fit a laptop: depth 6m+2 of basic blocks in three stages of width w, 2w, 4w."""
from __future__ import annotations

from torch import nn

from .recipe import init_model

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CIFAR_RESNETS = {"resnet8": 1, "resnet14": 2, "resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}
MODELS = TORCHVISION_RESNETS + tuple(CIFAR_RESNETS)


class BasicBlock(nn.Module):
    last_bn_name = "bn2"  # the BN that recipe.init_model zeroes

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int, width: int = 16, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], width
        for stage in range(3):
            cout = width * 2 ** stage
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layers(x)).flatten(1)
        return self.fc(x)


def build_model(name: str, num_classes: int, width: int = 16, fc_std: float = 0.01,
                zero_init_residual: bool = True, bn_momentum: float = 0.9) -> nn.Module:
    """A model with the paper's init applied (see recipe.init_model)."""
    if name in TORCHVISION_RESNETS:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    elif name in CIFAR_RESNETS:
        model = CifarResNet(CIFAR_RESNETS[name], num_classes, width=width)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return init_model(model, fc_std=fc_std, zero_init_residual=zero_init_residual, bn_momentum=bn_momentum)
