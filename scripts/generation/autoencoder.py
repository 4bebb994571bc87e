"""Stage 2 network: a KL-regularised video autoencoder, cines (B, 1, T, 96, 96) <-> latents (B, 16, T/2, 12, 12),
in the paper's 3D design or the lean (2+1)D cpu one (constructor arguments; both described in docs/README.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UpSample
from torch import nn
from torch.nn import functional as F

from scripts.generation.losses import gaussian_kl

Triple = tuple[int, int, int]


def _conv(cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1),
          padding: int | None = None) -> Convolution:
    """Plain 3D convolution; 'same' padding ((k - 1) // 2 per axis) unless `padding` is given."""
    return Convolution(3, cin, cout, strides=stride, kernel_size=kernel, padding=padding, conv_only=True)


def _axis_kernel(stride: Sequence[int]) -> Triple:
    """Kernel 3 along the axes a stride-2 step changes, 1 elsewhere (stride (1, 2, 2) -> kernel (1, 3, 3))."""
    return tuple(3 if s > 1 else 1 for s in stride)


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm -> SiLU -> conv) x 2, with a 1x1x1 projection when channels change."""

    def __init__(self, cin: int, cout: int, kernel: Triple, groups: int, eps: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(groups, cin, eps), nn.SiLU(), _conv(cin, cout, kernel),
                                  nn.GroupNorm(groups, cout, eps), nn.SiLU(), _conv(cout, cout, kernel))
        self.skip = _conv(cin, cout, (1, 1, 1)) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, t, h, w) -> (B, cout, t, h, w)."""
        return self.skip(x) + self.body(x)


class GlobalSelfAttention(nn.Module):
    """Single-head self-attention over all t*h*w positions, pre-GroupNorm, residual (the SD VAE's middle attention);
    our own as MONAI's `SABlock` needs einops, with the same parameters (q, k, v, output projections with biases)."""

    def __init__(self, c: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c, t, h, w) -> (B, c, t, h, w)."""
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, t*h*w, c)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)  # (B, t*h*w, c) each
        out = self.proj(F.scaled_dot_product_attention(q, k, v))  # (B, t*h*w, c)
        return x + out.transpose(1, 2).reshape(x.shape)


class CineAutoencoderKL(nn.Module):
    """KL video autoencoder (B, in_channels, T, H, W) -> mean, logvar (B, latent_channels, T/ft, H/fs, W/fs) -> recon;
    `channels`: width per level, `down_strides`: the (t, h, w) step after each level but the last. ValueError if bad."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, latent_channels: int = 16,
                 channels: Sequence[int] = (128, 256, 512, 512),
                 down_strides: Sequence[Sequence[int]] = ((1, 2, 2), (1, 2, 2), (2, 2, 2)),
                 encoder_res_blocks: int = 2, decoder_res_blocks: int = 4, temporal_kernel: int = 3,
                 stem_patch: Sequence[int] = (1, 1, 1), attention: bool = True, norm_num_groups: int = 32,
                 norm_eps: float = 1e-6, refine_channels: int = 0) -> None:
        super().__init__()
        channels, strides = tuple(channels), [tuple(s) for s in down_strides]
        patch = tuple(stem_patch)
        if len(strides) != len(channels) - 1 or any(len(s) != 3 or min(s) < 1 for s in [*strides, patch]):
            raise ValueError(f"need len(channels) - 1 down_strides of 3 positive ints and a 3-int stem_patch; got "
                             f"channels={channels}, down_strides={strides}, stem_patch={patch}")
        if any(c % norm_num_groups for c in channels) or temporal_kernel not in (1, 3):
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide channels={channels}; "
                             f"temporal_kernel must be 1 or 3, got {temporal_kernel}")
        self.latent_channels = latent_channels
        self.factors: Triple = tuple(math.prod(axis) for axis in zip(patch, *strides))  # (ft, fs, fs)
        kernel: Triple = (temporal_kernel, 3, 3)  # temporal_kernel 3: 3D convolutions, 1: per-frame 2D ones
        norm = {"groups": norm_num_groups, "eps": norm_eps}
        shared = {"latent": latent_channels, "channels": channels, "strides": strides, "kernel": kernel,
                  "patch": patch, "attention": attention, "norm": norm}
        self.encoder = self._encoder(in_channels, blocks=encoder_res_blocks, **shared)
        self.decoder = self._decoder(out_channels, blocks=decoder_res_blocks, refine=refine_channels, **shared)

    @staticmethod
    def _middle(c: int, kernel: Triple, attention: bool, norm: dict) -> nn.Sequential:
        """Residual -> (global self-attention) -> residual at width c."""
        attn = GlobalSelfAttention(c, **norm) if attention else nn.Identity()
        return nn.Sequential(ResBlock(c, c, kernel, **norm), attn, ResBlock(c, c, kernel, **norm))

    @classmethod
    def _encoder(cls, cin: int, latent: int, channels: tuple[int, ...], strides: list[Triple], blocks: int,
                 kernel: Triple, patch: Triple, attention: bool, norm: dict) -> nn.Sequential:
        """(B, cin, T, H, W) -> (B, 2 * latent, T/ft, H/fs, W/fs): stem, levels with down steps, middle, head."""
        # stem_patch (1, 1, 1): a 'same' convolution; else a patchifying one (stride = patch) undone by the decoder head
        stem = _conv(cin, channels[0], kernel) if patch == (1, 1, 1) else _conv(cin, channels[0], patch, patch, 0)
        layers: list[nn.Module] = [stem]
        c_in = channels[0]
        for level, c in enumerate(channels):
            for _ in range(blocks):
                layers.append(ResBlock(c_in, c, kernel, **norm))
                c_in = c
            if level < len(strides):
                layers.append(_conv(c, c, _axis_kernel(strides[level]), strides[level]))
        layers += [cls._middle(c_in, kernel, attention, norm), nn.GroupNorm(norm["groups"], c_in, norm["eps"]),
                   nn.SiLU(), _conv(c_in, 2 * latent, kernel), _conv(2 * latent, 2 * latent, (1, 1, 1))]
        return nn.Sequential(*layers)

    @classmethod
    def _decoder(cls, cout: int, latent: int, channels: tuple[int, ...], strides: list[Triple], blocks: int,
                 kernel: Triple, patch: Triple, attention: bool, norm: dict, refine: int = 0) -> nn.Sequential:
        """(B, latent, t, h, w) -> (B, cout, t * ft, h * fs, w * fs): the encoder's mirror with nearest upsampling."""
        c_in = channels[-1]
        layers: list[nn.Module] = [_conv(latent, latent, (1, 1, 1)), _conv(latent, c_in, kernel),
                                   cls._middle(c_in, kernel, attention, norm)]
        for level in reversed(range(len(channels))):
            c = channels[level]
            for _ in range(blocks):
                layers.append(ResBlock(c_in, c, kernel, **norm))
                c_in = c
            if level > 0:
                s = strides[level - 1]
                up_kernel = tuple(max(a, b) for a, b in zip(kernel, _axis_kernel(s)))  # upsampled and blocks' axes
                layers.append(UpSample(3, c, c, scale_factor=s, mode="nontrainable", pre_conv=None,
                                       post_conv=_conv(c, c, up_kernel), interp_mode="nearest", align_corners=None))
        if patch == (1, 1, 1):
            head = [_conv(c_in, cout, kernel)]
        elif refine:  # deconv to `refine` channels, then conv-SiLU-conv at full resolution (no patch seams)
            head = [UpSample(3, c_in, refine, scale_factor=patch, mode="deconv"), nn.SiLU(),
                    _conv(refine, refine, (1, 3, 3)), nn.SiLU(), _conv(refine, cout, (1, 3, 3))]
        else:
            head = [UpSample(3, c_in, cout, scale_factor=patch, mode="deconv")]
        layers += [nn.GroupNorm(norm["groups"], c_in, norm["eps"]), nn.SiLU(), *head]
        return nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, T, H, W) -> mean, logvar, each (B, latent, T/ft, H/fs, W/fs); logvar clamped to [-30, 20] (as SD)."""
        if x.ndim != 5 or any(n % f for n, f in zip(x.shape[2:], self.factors)):
            raise ValueError(f"expected (B, C, T, H, W) with T, H, W multiples of {self.factors}; "
                             f"got {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # (B, latent, t, h, w) each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent, t, h, w) -> (B, C, t * ft, h * fs, w * fs), linear (unbounded: clamping is the caller's)."""
        return self.decoder(z)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + exp(logvar / 2) * eps; eps ~ N(0, I) is drawn on the generator's device, so a seeded CPU
        generator gives the same draws on any device."""
        device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * eps

    @staticmethod
    def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements, averaged over the batch (SD convention)."""
        return gaussian_kl(mean, logvar)  # mean, logvar (B, latent, t, h, w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, T, H, W) -> (recon of that shape, mean, logvar): training decodes a posterior draw, eval the mean."""
        mean, logvar = self.encode(x)
        z = self.sample(mean, logvar) if self.training else mean  # (B, latent, t, h, w)
        return self.decode(z), mean, logvar
