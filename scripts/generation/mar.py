"""Masked autoregressive transformer (MAR) of CPGG: phenotype-conditioned generation of 3D-VAE cine latents
(B, 16, 25, 12, 12) as 180 tokens of 5 x 2 x 2 patches, each sampled by a per-token diffusion head (`DiffLoss`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks import eval_mode
from monai.networks.blocks import MLPBlock
from torch import nn

from scripts.generation.diffloss import DiffLoss, modulate


def patchify(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, L, D): L = (T/pt)(H/ph)(W/pw) tokens in (t, h, w) order, D = C*pt*ph*pw values
    in (c, pt, ph, pw) order."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, patch: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """(B, L, D) -> (B, C, T, H, W) with shape = (C, T, H, W); inverse of `patchify`."""
    c, t, h, w = shape
    pt, ph, pw = patch
    x = tokens.reshape(tokens.shape[0], t // pt, h // ph, w // pw, c, pt, ph, pw)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(tokens.shape[0], c, t, h, w)


def sample_mask_ratios(n: int, min_ratio: float = 0.7, std: float = 0.25,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) draws of N(1, std^2) truncated to [min_ratio, 1] by inverse CDF, the distribution of
    `scipy.stats.truncnorm((min_ratio - 1) / std, 0, loc=1, scale=std)`."""
    lo = torch.special.ndtr(torch.tensor((min_ratio - 1.0) / std, dtype=torch.float64))
    u = lo + (0.5 - lo) * torch.rand(n, dtype=torch.float64, generator=generator)  # uniform on [cdf(a), cdf(0)]
    return (1.0 + std * torch.special.ndtri(u)).clamp(min_ratio, 1.0)


def masking_schedule(seq_len: int, num_iter: int) -> list[int]:
    """Tokens still masked after each of `num_iter` decoding steps (cosine schedule, ends at 0); each step reveals at
    least one token and leaves at least one for every later step. ValueError unless 1 <= num_iter <= seq_len."""
    if not 1 <= num_iter <= seq_len:
        raise ValueError(f"num_iter must be in [1, {seq_len}], got {num_iter}")
    counts, remaining = [], seq_len
    for step in range(num_iter - 1):
        n = math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))
        remaining = min(max(n, num_iter - 1 - step), remaining - 1)
        counts.append(remaining)
    return counts + [0]


class Block(nn.Module):
    """Pre-norm ViT block (qkv bias, GELU MLP, LayerNorm eps 1e-6) on SDPA; dropout only in training. `adaptive`: the
    condition shifts and scales both norms and gates both branches (1 + gate; DiT's adaptive LayerNorm, modulations
    zero-initialised, so the block starts as the plain one). Not MONAI's TransformerBlock: it needs einops and, with
    flash attention, drops out in eval mode too (irreproducible samples), and it has no adaptive norm."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, dropout: float, adaptive: bool = False) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Sequential(nn.Linear(width, width), nn.Dropout(dropout))
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLPBlock(width, int(width * mlp_ratio), dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width)) if adaptive else None

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        """Self-attention branch: normalised tokens (B, L, width) -> (B, L, width)."""
        b, n, w = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, L, dh)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(a.transpose(1, 2).reshape(b, n, w))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, width), cond (B, width) (used by an adaptive block) -> (B, L, width)."""
        if self.ada is None:
            x = x + self._attend(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond)[:, None].chunk(6, dim=-1)  # (B, 1, width) each
        x = x + (1 + gate1) * self._attend(modulate(self.norm1(x), shift1, scale1))
        return x + (1 + gate2) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class MAR(nn.Module):
    """Phenotype-conditioned MAR (defaults: the paper's sizes); `forward` is the training loss, `sample_latents`
    generates. Latents are in the autoencoder's units; `latent_scale` (1 / their training std) is applied inside."""

    def __init__(self, n_phenotypes: int, latent_shape: Sequence[int] = (16, 25, 12, 12),
                 patch_size: Sequence[int] = (5, 2, 2), width: int = 768, encoder_depth: int = 12,
                 decoder_depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 buffer_size: int = 64, cond_drop_prob: float = 0.1, mask_ratio_min: float = 0.7,
                 head_depth: int = 3, head_width: int = 1024, num_train_timesteps: int = 1000,
                 diffusion_batch_mul: int = 4, latent_scale: float = 1.0, prediction_type: str = "epsilon",
                 head_condition: bool = False, adaptive_norm: bool = False) -> None:
        super().__init__()
        self.latent_shape, self.patch_size = tuple(latent_shape), tuple(patch_size)
        if any(s % p for s, p in zip(self.latent_shape[1:], self.patch_size)):
            raise ValueError(f"latent shape {self.latent_shape} is not divisible by patch {self.patch_size}")
        self.seq_len = math.prod(s // p for s, p in zip(self.latent_shape[1:], self.patch_size))
        self.token_dim = self.latent_shape[0] * math.prod(self.patch_size)
        self.buffer_size, self.cond_drop_prob, self.mask_ratio_min = buffer_size, cond_drop_prob, mask_ratio_min
        self.head_condition = head_condition  # the condition also added to every token's z (the head sees it directly)
        self.register_buffer("latent_scale", torch.tensor(float(latent_scale)))  # saved with the weights
        positions = self.seq_len + buffer_size

        self.cond_proj = nn.Linear(n_phenotypes, width)  # fills the `buffer_size` leading positions
        self.null_cond = nn.Parameter(torch.zeros(1, width))  # "no condition": dropout in training, CFG, unconditional
        self.z_proj = nn.Linear(self.token_dim, width)
        self.z_proj_norm = nn.LayerNorm(width, eps=1e-6)
        self.encoder_pos = nn.Parameter(torch.zeros(1, positions, width))
        self.encoder_blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, dropout, adaptive_norm)
                                            for _ in range(encoder_depth))  # adaptive: the condition in every block
        self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_embed = nn.Linear(width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos = nn.Parameter(torch.zeros(1, positions, width))
        self.decoder_blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, dropout, adaptive_norm)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.diffusion_pos = nn.Parameter(torch.zeros(1, self.seq_len, width))
        self._init_weights()  # before the head, which has its own initialisation
        self.diffloss = DiffLoss(self.token_dim, width, head_depth, head_width, num_train_timesteps,
                                 diffusion_batch_mul, prediction_type=prediction_type)  # head_width > token_dim

    def _init_weights(self) -> None:
        for p in (self.null_cond, self.mask_token, self.encoder_pos, self.decoder_pos, self.diffusion_pos):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for block in (*self.encoder_blocks, *self.decoder_blocks):
            if block.ada is not None:  # modulations start at zero: the plain blocks
                nn.init.zeros_(block.ada[-1].weight)
                nn.init.zeros_(block.ada[-1].bias)

    def _condition(self, phenotypes: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, P) normalised phenotypes or None (unconditional) -> (B, width); condition dropout in training."""
        null = self.null_cond.expand(batch, -1)
        if phenotypes is None:
            return null
        cond = self.cond_proj(phenotypes)
        if self.training and self.cond_drop_prob > 0:
            drop = torch.rand(batch, 1, device=cond.device) < self.cond_drop_prob
            cond = torch.where(drop, null, cond)
        return cond

    def _encode(self, tokens: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D), mask (B, L) true = masked (same count per row), cond (B, width)
        -> (B, buffer + visible, width)."""
        b = tokens.shape[0]
        x = torch.cat([cond[:, None].expand(b, self.buffer_size, -1), self.z_proj(tokens)], dim=1)  # (B, buf + L, w)
        x = self.z_proj_norm(x + self.encoder_pos)
        keep = F.pad(~mask, (self.buffer_size, 0), value=True)  # (B, buf + L)
        x = x[keep].reshape(b, -1, x.shape[-1])  # drop masked tokens
        for block in self.encoder_blocks:
            x = block(x, cond)
        return self.encoder_norm(x)

    def _decode(self, x: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, buffer + visible, width), mask (B, L), cond (B, width) -> z (B, L, width) for the
        diffusion head."""
        b, _, w = x.shape
        keep = F.pad(~mask, (self.buffer_size, 0), value=True)  # (B, buf + L)
        visible = self.decoder_embed(x).reshape(-1, w)  # bf16 under autocast
        full = self.mask_token.to(visible.dtype).expand(b, keep.shape[1], w).clone()
        full[keep] = visible
        x = full + self.decoder_pos
        for block in self.decoder_blocks:
            x = block(x, cond)
        z = self.decoder_norm(x)[:, self.buffer_size:] + self.diffusion_pos
        return z + cond[:, None].to(z.dtype) if self.head_condition else z

    def forward(self, latents: torch.Tensor, phenotypes: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss: latents (B, C, T, H, W), phenotypes (B, P) normalised or None -> scalar; one mask ratio per
        batch, a random order per sample, the diffusion loss on the masked tokens."""
        tokens = patchify(latents * self.latent_scale, self.patch_size)  # (B, L, D)
        b = tokens.shape[0]
        n_masked = math.ceil(self.seq_len * sample_mask_ratios(1, self.mask_ratio_min).item())
        ranks = torch.rand(b, self.seq_len, device=tokens.device).argsort(dim=1).argsort(dim=1)  # random order
        mask = ranks < n_masked  # (B, L)
        cond = self._condition(phenotypes, b)  # (B, width)
        z = self._decode(self._encode(tokens, mask, cond), mask, cond)  # (B, L, width)
        return self.diffloss.loss(tokens.reshape(b * self.seq_len, -1), z.reshape(b * self.seq_len, -1),
                                  mask.reshape(-1))

    @torch.no_grad()
    def sample_latents(self, phenotypes: torch.Tensor | None = None, seeds: Sequence[int] | None = None,
                       num_samples: int | None = None, num_iter: int = 16, cfg: float = 3.0,
                       cfg_schedule: str = "linear", temperature: float = 1.0, num_inference_steps: int = 100,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Iterative decoding (eval mode) -> latents (B, C, T, H, W); B from phenotypes (normalised; None:
        unconditional, unguided), seeds or num_samples. cfg >= 1: "linear" ramp with revealed tokens, or "constant"."""
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        if cfg < 1.0:
            raise ValueError(f"cfg must be >= 1, got {cfg}")
        b = len(phenotypes) if phenotypes is not None else len(seeds) if seeds is not None else num_samples
        if not b:
            raise ValueError("give phenotypes, seeds or num_samples >= 1")
        if seeds is None:
            seeds = torch.randint(0, 2**62, (b,), generator=generator).tolist()
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for a batch of {b}")
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]  # per sample: the same alone or in a batch
        device = self.mask_token.device
        ranks = torch.stack([torch.randperm(self.seq_len, generator=g) for g in gens]).argsort(dim=1).to(device)

        with eval_mode(self):  # no dropout, no condition dropout
            guided = cfg > 1.0 and phenotypes is not None
            cond = self._condition(phenotypes, b)  # (B, width)
            if guided:
                cond = torch.cat([cond, self.null_cond.expand(b, -1)])  # (2B, width): [cond; uncond]
            rows = 2 if guided else 1
            tokens = torch.zeros(b, self.seq_len, self.token_dim, device=device, dtype=self.mask_token.dtype)
            mask = torch.ones(b, self.seq_len, dtype=torch.bool, device=device)
            for n_next in masking_schedule(self.seq_len, num_iter):
                z = self._decode(self._encode(tokens.repeat(rows, 1, 1), mask.repeat(rows, 1), cond),
                                 mask.repeat(rows, 1), cond)  # (rows * B, L, width)
                mask_next = ranks < n_next  # the first n_next tokens of each order stay masked
                to_pred = mask & ~mask_next  # (B, L), the same count per row
                cfg_iter = 1 + (cfg - 1) * (self.seq_len - n_next) / self.seq_len if cfg_schedule == "linear" else cfg
                tokens[to_pred] = self.diffloss.sample(z[to_pred.repeat(rows, 1)], temperature,
                                                       cfg_iter if guided else 1.0, gens, num_inference_steps)
                mask = mask_next
        return unpatchify(tokens, self.patch_size, self.latent_shape) / self.latent_scale
