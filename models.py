"""The two networks, built from ResNet-18 pieces written out here (randomly initialised unless
--pretrained names a local torchvision state-dict file). predict.py runs them on a study.

Slices (B, D, 2, H, W) -> heatmap logits (B, K, D, H/2, W/2); crops and their groups -> logits:

    >>> import torch
    >>> LandmarkNet(n_points=5)(torch.zeros(1, 7, 2, 64, 64)).shape
    torch.Size([1, 5, 7, 32, 32])
    >>> SeverityNet(n_slices=5)(torch.zeros(4, 5, 48, 48), torch.tensor([0, 1, 2, 2])).shape
    torch.Size([4, 3])
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

MASKED = -1e4  # the logit of a heatmap cell a point may not take: no probability after the softmax


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut; the first convolution may halve the resolution, and
    then a strided 1x1 convolution brings the shortcut to the new shape."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)), inplace=True)


class ResNet18Trunk(nn.Module):
    """ResNet-18 (He et al., 2016) up to layer3: stride 16, 256 channels. The parameter names are
    torchvision's, so its ResNet-18 state-dict files load (their layer4 and classifier are not
    used); the first convolution takes in_channels grey channels, its filters the mean of the RGB
    ones. The networks below take its pieces; it has no forward of its own."""

    def __init__(self, in_channels, pretrained_path=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)  # RGB, as the state-dict files
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))  # stride 4
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))  # stride 8
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))  # stride 16
        for module in self.modules():  # BatchNorm starts at weight 1, bias 0
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if pretrained_path:
            self.load(pretrained_path)
        first = self.conv1.weight.data.mean(dim=1, keepdim=True)  # (64, 1, 7, 7)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.conv1.weight.data.copy_(first.repeat(1, in_channels, 1, 1) / in_channels)

    def load(self, path):
        """Weights from a local torchvision ResNet-18 state-dict file; a wrong file is named."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing, unexpected = self.load_state_dict(state, strict=False)
        except Exception as error:  # not a torch file, or tensors of the wrong shapes
            why = f"{type(error).__name__}: {str(error)[:200]}"
            raise ValueError(f"{path}: not a ResNet-18 state dict ({why})") from error
        unexpected = [key for key in unexpected if not key.startswith(("layer4.", "fc."))]
        if missing or unexpected:
            raise ValueError(f"{path}: not a ResNet-18 state dict "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def channels_last_(net):
    """Store the 2D convolution weights channels-last (NHWC); the activations follow the weights,
    so convolution, BatchNorm and max-pool run on their NHWC kernels, on a CPU and on a GPU. On the
    CPU here the NCHW max-pool alone took 7 % of a landmark training step, and float32 epochs got
    10-20 % quicker (EXPERIMENTS.md, 2026-12-06, "the plumbing's cost"). The depth-mixing Conv3d
    keeps its 5-D weights as they are."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


class LandmarkNet(nn.Module):
    """Per-slice encoder-decoder producing one heatmap per point; slices of a series are mixed in
    depth.

    Input (B, D, 2, H, W): channel 0 the slice, channel 1 the slice's offset across the stack (mm /
    50), constant over the slice, so left and right parasagittal slices are told apart. Output
    logits (B, K, D, H/2, W/2); the caller takes a softmax over (D, H/2, W/2) per point (3D
    soft-argmax).
    """

    def __init__(self, n_points, pretrained_path=None, width=32):
        super().__init__()
        trunk = ResNet18Trunk(2, pretrained_path)
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu)  # stride 2, 64 ch
        self.layer1 = nn.Sequential(trunk.maxpool, trunk.layer1)  # stride 4, 64 ch
        self.layer2 = trunk.layer2  # stride 8, 128 ch
        # stride 16, 256 ch: a field of view wide enough to count the discs
        self.layer3 = trunk.layer3
        # neighbouring slices
        self.depth_mix = nn.Conv3d(256, 256, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.up3 = nn.Conv2d(256 + 128, width * 2, 3, padding=1)
        self.up2 = nn.Conv2d(width * 2 + 64, width * 2, 3, padding=1)
        self.up1 = nn.Conv2d(width * 2 + 64, width, 3, padding=1)
        self.head = nn.Conv2d(width, n_points, 1)
        channels_last_(self)

    def forward(self, slices):
        batch, depth = slices.shape[:2]
        x = slices.flatten(0, 1)  # (B*D, 2, H, W)
        s2 = self.stem(x)
        s4 = self.layer1(s2)
        s8 = self.layer2(s4)
        s16 = self.layer3(s8)
        mixed = s16.unflatten(0, (batch, depth)).transpose(1, 2)  # (B, 256, D, h, w)
        s16 = s16 + F.relu(self.depth_mix(mixed)).transpose(1, 2).flatten(0, 1)
        y = F.interpolate(s16, size=s8.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(self.up3(torch.cat([y, s8], dim=1)))
        y = F.interpolate(y, size=s4.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(self.up2(torch.cat([y, s4], dim=1)))
        y = F.interpolate(y, size=s2.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(self.up1(torch.cat([y, s2], dim=1)))
        heat = self.head(y)  # (B*D, K, H/2, W/2)
        return heat.unflatten(0, (batch, depth)).transpose(1, 2)  # (B, K, D, H/2, W/2)


class SeverityNet(nn.Module):
    """2.5D grading: a per-slice CNN, attention pooling over the slices, one 3-logit head per
    condition group.

    Input crops (B, S, C, C) and the condition group of each crop (B,) (an index into data.GROUPS);
    right-side crops arrive mirrored onto the left, so both sides share the head.
    """

    def __init__(self, n_slices, n_groups=len(data.GROUPS), pretrained_path=None, width=256):
        super().__init__()
        trunk = ResNet18Trunk(1, pretrained_path)
        self.encoder = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool,
                                     trunk.layer1, trunk.layer2, trunk.layer3,
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (N, 256)
        # where in the 2.5D stack a slice is
        self.slice_embedding = nn.Parameter(torch.zeros(n_slices, width))
        self.group_embedding = nn.Embedding(n_groups, width)
        self.attention = nn.Linear(width, 1)
        self.heads = nn.Linear(width, data.N_SEVERITIES * n_groups)
        channels_last_(self)

    def forward(self, crops, groups):
        batch, n_slices = crops.shape[:2]
        # (B, S, 256)
        features = self.encoder(crops.flatten(0, 1)[:, None]).view(batch, n_slices, -1)
        features = features + self.slice_embedding + self.group_embedding(groups)[:, None]
        weights = self.attention(torch.tanh(features)).softmax(dim=1)  # (B, S, 1)
        pooled = (weights * features).sum(dim=1)  # (B, 256)
        logits = self.heads(pooled).view(batch, -1, data.N_SEVERITIES)  # (B, groups, 3)
        return logits[torch.arange(batch, device=crops.device), groups]  # (B, 3)

