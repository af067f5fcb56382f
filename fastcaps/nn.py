"""Capsule layers and the CapsNet of Sabour, Frosst & Hinton (2017) as ``nn.Module``s."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcaps.backend import prepare
from fastcaps.functional import capsule_routing, squash


def conv_to_capsules(features: Tensor, capsule_dim: int) -> Tensor:
    """Group a conv output [B, types * capsule_dim, H, W] into capsules
    [B, types * H * W, capsule_dim].

    Channel ``t * capsule_dim + d`` is dimension d of capsule type t, so each capsule's values
    come from the channels of one type at one position; capsule index is ``(t * H + y) * W + x``.
    (Reshaping without the permute, as many public versions do, mixes positions into capsules.)
    """
    batch, channels, height, width = features.shape
    if channels % capsule_dim:
        raise ValueError(
            f"features must have a multiple of capsule_dim = {capsule_dim} channels, got {channels}"
        )
    types = channels // capsule_dim
    grouped = features.view(batch, types, capsule_dim, height, width).permute(0, 1, 3, 4, 2)
    return grouped.reshape(batch, types * height * width, capsule_dim)


class PrimaryCapsules(nn.Module):
    """Convolution, grouping into capsules, squash: [B, C, H, W] -> [B, types * H' * W', dim]."""

    def __init__(
        self,
        in_channels: int = 256,
        capsule_types: int = 32,
        capsule_dim: int = 8,
        kernel_size: int = 9,
        stride: int = 2,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.capsule_dim = capsule_dim
        prepare(backend)
        self.backend = backend
        self.conv = nn.Conv2d(in_channels, capsule_types * capsule_dim, kernel_size, stride)

    def forward(self, x: Tensor) -> Tensor:
        return squash(conv_to_capsules(self.conv(x), self.capsule_dim), backend=self.backend)


class RoutingCapsules(nn.Module):
    """Fully connected capsule layer with dynamic routing: [B, Nin, Din] -> [B, Nout, Dout].

    ``weight`` is [Nin, Nout, Dout, Din]; ``bias`` (optional) is [Nout, Dout].
    """

    def __init__(
        self,
        in_capsules: int,
        in_dim: int,
        out_capsules: int,
        out_dim: int,
        iterations: int = 3,
        bias: bool = False,
        detach_logits: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.in_capsules, self.in_dim = in_capsules, in_dim
        self.out_capsules, self.out_dim = out_capsules, out_dim
        self.iterations = iterations
        self.detach_logits = detach_logits
        prepare(backend)
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(in_capsules, out_capsules, out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_capsules, out_dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # With std 0.05 the first routing pass of the paper's layer (1152 -> 10x16 from squashed
        # 8D inputs) gives output lengths of order 0.1-0.5 rather than ~0.01 for std 0.01, and a
        # 1-epoch, 3,000-image CPU run reached 92.8-94.1% test accuracy (std 0.01: 90.6-93.1%).
        nn.init.normal_(self.weight, std=0.05)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, u: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(u.device.type) and weight.dtype != u.dtype:
            # autocast hands over half-precision capsules; the routing ops take one dtype and
            # accumulate in float32 themselves, the master weights stay float32
            weight = weight.to(u.dtype)
            bias = None if bias is None else bias.to(u.dtype)
        return capsule_routing(
            u,
            weight,
            self.iterations,
            bias,
            detach_logits=self.detach_logits,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_capsules}x{self.in_dim} -> {self.out_capsules}x{self.out_dim}, "
            f"iterations={self.iterations}, bias={self.bias is not None}, "
            f"detach_logits={self.detach_logits}, backend={self.backend!r}"
        )


class CapsNetOutput(NamedTuple):
    lengths: Tensor  # [B, classes]: class scores, the lengths of the digit capsules
    poses: Tensor  # [B, classes, digit_dim]: the digit capsules
    reconstructions: Tensor | None  # [B, channels * H * W] in [0, 1], or None without decoder


class Prediction(NamedTuple):
    classes: Tensor  # [B]: the predicted class, the longest digit capsule
    lengths: Tensor  # [B, classes]
    poses: Tensor  # [B, classes, digit_dim]


class CapsNet(nn.Module):
    """The paper's MNIST CapsNet; every size is configurable, the defaults are the paper's.

    conv1 (256 @ 9x9, ReLU) -> PrimaryCapsules (32 types x 8D @ 9x9 stride 2: 1152 capsules on
    28x28 input) -> RoutingCapsules (10 x 16D, 3 iterations) -> decoder (512, 1024, image; ReLU,
    ReLU, sigmoid) fed with the digit capsules masked to one class: the label in training mode
    when ``labels`` are given, else the longest capsule.
    """

    def __init__(
        self,
        image_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        conv_channels: int = 256,
        conv_kernel: int = 9,
        primary_types: int = 32,
        primary_dim: int = 8,
        primary_kernel: int = 9,
        primary_stride: int = 2,
        digit_dim: int = 16,
        iterations: int = 3,
        routing_bias: bool = False,
        detach_logits: bool = False,
        decoder_sizes: tuple[int, ...] | None = (512, 1024),
        backend: str | None = None,
    ) -> None:
        super().__init__()
        # the constructor arguments that fix the architecture (stored in checkpoints)
        self.config = dict(
            image_size=image_size, in_channels=in_channels, num_classes=num_classes,
            conv_channels=conv_channels, conv_kernel=conv_kernel, primary_types=primary_types,
            primary_dim=primary_dim, primary_kernel=primary_kernel, primary_stride=primary_stride,
            digit_dim=digit_dim, iterations=iterations, routing_bias=routing_bias,
            detach_logits=detach_logits,
            decoder_sizes=None if decoder_sizes is None else list(decoder_sizes),
        )  # fmt: skip
        conv_size = image_size - conv_kernel + 1
        grid = (conv_size - primary_kernel) // primary_stride + 1
        if conv_size < 1 or grid < 1:
            raise ValueError(
                f"image_size = {image_size} is too small for conv_kernel = {conv_kernel}, "
                f"primary_kernel = {primary_kernel}, primary_stride = {primary_stride}"
            )
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.conv1 = nn.Conv2d(in_channels, conv_channels, conv_kernel)
        self.primary = PrimaryCapsules(
            conv_channels, primary_types, primary_dim, primary_kernel, primary_stride, backend
        )
        self.digits = RoutingCapsules(
            primary_types * grid * grid,
            primary_dim,
            num_classes,
            digit_dim,
            iterations,
            bias=routing_bias,
            detach_logits=detach_logits,
            backend=backend,
        )
        self.decoder: nn.Sequential | None = None
        if decoder_sizes is not None:
            layers: list[nn.Module] = []
            width = num_classes * digit_dim
            for size in decoder_sizes:
                layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
                width = size
            layers += [nn.Linear(width, in_channels * image_size * image_size), nn.Sigmoid()]
            self.decoder = nn.Sequential(*layers)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> CapsNetOutput:
        """images [B, C, H, W] (values in [0, 1]); labels [B] class indices (used for the decoder
        mask in training mode)."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be a floating-point tensor with values in [0, 1], got dtype "
                f"{images.dtype} (for uint8 pixels use images.float() / 255)"
            )
        if labels is not None:
            self._check_labels(labels, images.shape[0])
        features = F.relu(self.conv1(images), inplace=True)
        poses = self.digits(self.primary(features))
        lengths = poses.norm(dim=-1)
        reconstructions = None
        if self.decoder is not None:
            chosen = labels if (self.training and labels is not None) else lengths.argmax(dim=1)
            reconstructions = self.decode(poses, chosen)
        return CapsNetOutput(lengths, poses, reconstructions)

    def _check_labels(self, labels: Tensor, batch: int) -> None:
        classes = self.digits.out_capsules
        if (
            not isinstance(labels, Tensor)
            or labels.is_floating_point()
            or labels.dtype == torch.bool
            or tuple(labels.shape) != (batch,)
        ):
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else labels
            raise ValueError(
                f"labels must be an integer tensor of shape [B] = ({batch},), got {got}"
            )
        if torch.compiler.is_compiling() or labels.is_cuda:
            # a value check would wait for the GPU on every step; out-of-range indices there
            # fail in the decoder's one_hot (a CUDA device-side assert) instead
            return
        if bool(((labels < 0) | (labels >= classes)).any()):
            raise ValueError(
                f"labels must be class indices in [0, {classes - 1}], got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )

    def decode(self, poses: Tensor, classes: Tensor) -> Tensor:
        """Reconstructions [B, C * H * W] from the digit capsules [B, classes, digit_dim], all
        but the capsule of ``classes`` [B] masked to zero."""
        if self.decoder is None:
            raise ValueError("this CapsNet has no decoder (decoder_sizes=None)")
        mask = F.one_hot(classes, self.num_classes).to(poses.dtype)
        return self.decoder((poses * mask.unsqueeze(-1)).flatten(1))

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Class, capsule lengths and pose vectors of images: uint8 pixels in 0..255 or floats in
        [0, 1], shaped [B, C, H, W] or (one channel) [B, H, W]. Eval mode, no grad; the module's
        training flag is restored."""
        images = self.prepare_images(images)
        was_training = self.training
        self.eval()
        try:
            out = self(images)
        finally:
            self.train(was_training)
        return Prediction(out.lengths.argmax(dim=1), out.lengths, out.poses)

    def prepare_images(self, images: Tensor) -> Tensor:
        """uint8 [B, H, W] / [B, C, H, W] in 0..255, or float in [0, 1] -> the float
        [B, C, H, W] in [0, 1] that ``forward`` takes (in the parameters' dtype)."""
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dtype == torch.uint8:
            return images.to(self.conv1.weight.dtype).div_(255)
        if not images.is_floating_point():
            raise ValueError(
                f"images must be uint8 pixels in 0..255 or floats in [0, 1], got dtype "
                f"{images.dtype}"
            )
        if images.numel() and not bool(((images >= 0) & (images <= 1)).all()):
            raise ValueError(
                f"float images must have values in [0, 1], got values in "
                f"[{images.min().item():.4g}, {images.max().item():.4g}]; divide 0..255 pixels "
                "by 255 (or pass them as uint8)"
            )
        return images

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, map_location: str | torch.device = "cpu",
        backend: str | None = None,
    ) -> CapsNet:  # fmt: skip
        """A CapsNet rebuilt from a checkpoint written by ``fastcaps.training`` (loaded with
        ``weights_only=True``), in eval mode."""
        from fastcaps.runs import load_checkpoint

        checkpoint = load_checkpoint(path, map_location)
        config = dict(checkpoint["model_config"])
        model = cls(**config, backend=backend)
        model.load_state_dict(checkpoint["model"])
        return model.to(map_location).eval()
