"""Capsule layers and networks as ``nn.Module``s: the CapsNet of Sabour, Frosst & Hinton (2017)
with dynamic routing, and Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021) with
self-attention routing."""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcaps.backend import prepare
from fastcaps.functional import capsule_attention_routing, capsule_routing, exp_squash, squash


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


def _autocast_parameters(u: Tensor, *parameters: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast the capsules arrive in half precision; the routing ops take one dtype and
    accumulate in float32 themselves, while the master parameters stay float32."""
    if torch.is_autocast_enabled(u.device.type):
        return tuple(None if p is None else p.to(u.dtype) for p in parameters)
    return parameters


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
        weight, bias = _autocast_parameters(u, self.weight, self.bias)
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


class CapsuleClassifier(nn.Module):
    """What the capsule networks share: input checks, the class scores (capsule lengths), the
    decoder fed with the capsules masked to one class (the label in training mode when
    ``labels`` are given, else the longest capsule), ``predict`` and ``from_checkpoint``.
    Subclasses build ``decoder`` (or None), set ``config``, ``image_size``, ``in_channels`` and
    ``num_classes``, and implement ``capsules``."""

    config: dict[str, Any]
    decoder: nn.Sequential | None

    def capsules(self, images: Tensor) -> Tensor:
        """The class capsules [B, classes, dim] of checked images [B, C, H, W]."""
        raise NotImplementedError

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
        poses = self.capsules(images)
        lengths = poses.norm(dim=-1)
        reconstructions = None
        if self.decoder is not None:
            chosen = labels if (self.training and labels is not None) else lengths.argmax(dim=1)
            reconstructions = self.decode(poses, chosen)
        return CapsNetOutput(lengths, poses, reconstructions)

    def _check_labels(self, labels: Tensor, batch: int) -> None:
        classes = self.num_classes
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
            raise ValueError(f"this {type(self).__name__} has no decoder (decoder_sizes=None)")
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
            return images.to(next(self.parameters()).dtype).div_(255)
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
    ) -> CapsuleClassifier:  # fmt: skip
        """The network rebuilt from a checkpoint written by ``fastcaps.training`` (loaded with
        ``weights_only=True``), in eval mode. ``CapsuleClassifier.from_checkpoint`` builds
        whichever network the checkpoint holds; a subclass accepts only its own."""
        from fastcaps.runs import CheckpointError, load_checkpoint

        checkpoint = load_checkpoint(path, map_location)
        name = checkpoint.get("model_class", "CapsNet")  # checkpoints before 2 networks existed
        network = NETWORKS.get(name)
        if network is None:
            raise CheckpointError(f"{path} holds an unknown network {name!r}")
        if cls is not CapsuleClassifier and network is not cls:
            raise CheckpointError(
                f"{path} holds a {name}, not a {cls.__name__}; use {name}.from_checkpoint (or "
                "fastcaps.nn.CapsuleClassifier.from_checkpoint)"
            )
        model = network(**dict(checkpoint["model_config"]), backend=backend)
        model.load_state_dict(checkpoint["model"])
        return model.to(map_location).eval()


class CapsNet(CapsuleClassifier):
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
        self.decoder = _decoder(num_classes * digit_dim, decoder_sizes, in_channels * image_size**2)

    def capsules(self, images: Tensor) -> Tensor:
        features = F.relu(self.conv1(images), inplace=True)
        return self.digits(self.primary(features))


def _decoder(width: int, sizes: tuple[int, ...] | None, pixels: int) -> nn.Sequential | None:
    """Fully connected layers of ``sizes`` (ReLU) and a sigmoid output of ``pixels`` values."""
    if sizes is None:
        return None
    layers: list[nn.Module] = []
    for size in sizes:
        layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, pixels), nn.Sigmoid())


def _he_normal_(tensor: Tensor, fan_in: int) -> Tensor:
    """Keras' ``he_normal``: a normal of std sqrt(2 / fan_in) truncated at two std (the std
    corrected for the truncation), as Efficient-CapsNet's authors initialise."""
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


class AttentionRoutingCapsules(nn.Module):
    """Fully connected capsule layer with self-attention routing (Efficient-CapsNet):
    [B, Nin, Din] -> [B, Nout, Dout].

    ``weight`` is [Nin, Nout, Dout, Din]; ``prior`` (optional, zero-initialised) is the learned
    [Nin, Nout] coupling added after the softmax.
    """

    def __init__(
        self,
        in_capsules: int,
        in_dim: int,
        out_capsules: int,
        out_dim: int,
        prior: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.in_capsules, self.in_dim = in_capsules, in_dim
        self.out_capsules, self.out_dim = out_capsules, out_dim
        prepare(backend)
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(in_capsules, out_capsules, out_dim, in_dim))
        self.prior = nn.Parameter(torch.empty(in_capsules, out_capsules)) if prior else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the authors' Keras he_normal on their [Nout, Nin, Din, Dout] kernel: fan_in is
        # Nout * Nin * Din (Keras' rule for kernels of rank > 2)
        _he_normal_(self.weight, self.out_capsules * self.in_capsules * self.in_dim)
        if self.prior is not None:
            nn.init.zeros_(self.prior)

    def forward(self, u: Tensor) -> Tensor:
        weight, prior = _autocast_parameters(u, self.weight, self.prior)
        return capsule_attention_routing(u, weight, prior, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"{self.in_capsules}x{self.in_dim} -> {self.out_capsules}x{self.out_dim}, "
            f"prior={self.prior is not None}, backend={self.backend!r}"
        )


class EfficientCapsNet(CapsuleClassifier):
    """Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021); the defaults are the paper's MNIST
    network (161,824 trainable parameters outside the decoder).

    Four convolutions (32 @ 5x5, 64 @ 3x3, 64 @ 3x3, 128 @ 3x3 stride 2; each with ReLU, then
    BatchNorm, in the authors' order) -> primary capsules from a depthwise convolution over the
    whole remaining map (9x9 on 28x28 input, one filter per channel) read as 16 capsules of 8D
    and exp-squashed -> self-attention routing to ``num_classes`` capsules of 16D -> decoder
    (512, 1024, image; ReLU, ReLU, sigmoid) on the capsules masked to one class.
    """

    def __init__(
        self,
        image_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        conv_channels: tuple[int, ...] = (32, 64, 64, 128),
        conv_kernels: tuple[int, ...] = (5, 3, 3, 3),
        conv_strides: tuple[int, ...] = (1, 1, 1, 2),
        primary_capsules: int = 16,
        primary_dim: int = 8,
        digit_dim: int = 16,
        prior: bool = True,
        decoder_sizes: tuple[int, ...] | None = (512, 1024),
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not len(conv_channels) == len(conv_kernels) == len(conv_strides) >= 1:
            raise ValueError(
                "conv_channels, conv_kernels and conv_strides must have one entry per "
                f"convolution, got {len(conv_channels)}, {len(conv_kernels)}, {len(conv_strides)}"
            )
        if primary_capsules * primary_dim != conv_channels[-1]:
            raise ValueError(
                f"primary_capsules * primary_dim must equal the last conv's channels "
                f"{conv_channels[-1]} (one depthwise filter per channel), got "
                f"{primary_capsules} * {primary_dim}"
            )
        self.config = dict(
            image_size=image_size, in_channels=in_channels, num_classes=num_classes,
            conv_channels=list(conv_channels), conv_kernels=list(conv_kernels),
            conv_strides=list(conv_strides), primary_capsules=primary_capsules,
            primary_dim=primary_dim, digit_dim=digit_dim, prior=prior,
            decoder_sizes=None if decoder_sizes is None else list(decoder_sizes),
        )  # fmt: skip
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.primary_capsules, self.primary_dim = primary_capsules, primary_dim
        layers: list[nn.Module] = []
        size, channels = image_size, in_channels
        for out, kernel, stride in zip(conv_channels, conv_kernels, conv_strides, strict=True):
            size = (size - kernel) // stride + 1
            if size < 1:
                raise ValueError(
                    f"image_size = {image_size} is too small for the convolutions "
                    f"{list(conv_kernels)} with strides {list(conv_strides)}"
                )
            conv = nn.Conv2d(channels, out, kernel, stride)
            _he_normal_(conv.weight, channels * kernel * kernel)
            nn.init.zeros_(conv.bias)
            # Keras' BatchNormalization: momentum 0.99 (0.01 here), epsilon 1e-3
            layers += [conv, nn.ReLU(inplace=True), nn.BatchNorm2d(out, eps=1e-3, momentum=0.01)]
            channels = out
        self.features = nn.Sequential(*layers)
        # one size x size filter per channel: a 1 x 1 map, read as the primary capsules
        self.primary = nn.Conv2d(channels, channels, size, groups=channels)
        nn.init.xavier_uniform_(self.primary.weight)
        nn.init.zeros_(self.primary.bias)
        self.digits = AttentionRoutingCapsules(
            primary_capsules, primary_dim, num_classes, digit_dim, prior=prior, backend=backend
        )
        self.backend = backend
        self.decoder = _decoder(num_classes * digit_dim, decoder_sizes, in_channels * image_size**2)
        if self.decoder is not None:
            for layer in self.decoder:
                if isinstance(layer, nn.Linear):
                    last = layer is self.decoder[-2]
                    if last:  # Keras' glorot_normal (truncated) before the sigmoid
                        fan = layer.in_features + layer.out_features
                        std = math.sqrt(2.0 / fan) / 0.87962566103423978
                        nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
                    else:
                        _he_normal_(layer.weight, layer.in_features)
                    nn.init.zeros_(layer.bias)

    def capsules(self, images: Tensor) -> Tensor:
        primary = self.primary(self.features(images)).view(
            images.shape[0], self.primary_capsules, self.primary_dim
        )
        return self.digits(exp_squash(primary, backend=self.backend))


# the networks ``CapsuleClassifier.from_checkpoint`` can rebuild, by checkpoint "model_class"
NETWORKS: dict[str, type[CapsuleClassifier]] = {
    "CapsNet": CapsNet,
    "EfficientCapsNet": EfficientCapsNet,
}
