"""Per-token diffusion loss of CPGG/MAR: an adaptive-norm residual MLP denoises one continuous token given z.
Schedule, noising and inference timesteps come from MONAI's DDPMScheduler; the respaced step and VLB term are here."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from monai.networks.schedulers import DDPMScheduler
from torch import nn

Generators = torch.Generator | Sequence[torch.Generator] | None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive norm: x * (1 + scale) + shift (shift and scale broadcast over x)."""
    return x * (1 + scale) + shift


class _ResBlock(nn.Module):
    """LayerNorm -> adaptive shift/scale -> Linear-SiLU-Linear, gated residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (N, width) -> (N, width)."""
        shift, scale, gate = self.ada(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class AdaLNMLP(nn.Module):
    """Noise predictor eps_theta(x_t | t, z): (N, token_dim) -> (N, 2 * token_dim) = [eps, variance value v].
    Timestep and z embeddings sum into every block's modulation; modulations and output start at zero (eps = v = 0)."""

    def __init__(self, token_dim: int, z_dim: int, width: int = 1024, depth: int = 3, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embed = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(z_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(_ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, 2 * token_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x (N, token_dim), t (N,) integer steps, z (N, z_dim) -> (N, 2 * token_dim)."""
        y = self.time_embed(get_timestep_embedding(t, self.freq_dim).to(z)) + self.cond_embed(z)  # (N, width)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, y)
        shift, scale = self.final_ada(y).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(h), shift, scale))


# Not DDPMScheduler.step (MONAI 1.6.1): it takes t - 1 as the previous step even after set_timesteps(100), has no
# temperature on the per-step noise, interpolates the learned variance range linearly instead of in log space, and
# MONAI has no variational-bound term; both follow improved DDPM (Nichol & Dhariwal 2021).
def _posterior(x0: torch.Tensor, x_t: torch.Tensor, acp_t: torch.Tensor, acp_prev: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q(x_prev | x_t, x0) for a (possibly respaced) step t -> prev: (mean, beta, variance).
    acp_* are cumulative alpha products, scalars or (N, 1); beta = 1 - acp_t / acp_prev is the step's noise level."""
    beta = 1 - acp_t / acp_prev
    mean = (acp_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - acp_prev) * x_t) / (1 - acp_t)
    return mean, beta, beta * (1 - acp_prev) / (1 - acp_t)


def _learned_log_variance(v: torch.Tensor, beta: torch.Tensor, post_var: torch.Tensor) -> torch.Tensor:
    """Learned range: log-variance interpolated between log(posterior variance) (v = -1) and log(beta) (v = 1)."""
    frac = (v + 1) / 2
    return frac * beta.log() + (1 - frac) * post_var.log()


def _randn(rows: int, dim: int, generator: Generators, like: torch.Tensor) -> torch.Tensor:
    """(rows, dim) standard normal drawn on the CPU (same draws on any device); a sequence of generators draws equal
    consecutive chunks of rows, one per generator (one per sample); ValueError if rows do not split evenly."""
    if generator is None or isinstance(generator, torch.Generator):
        noise = torch.randn(rows, dim, generator=generator)
    else:
        if rows % len(generator):
            raise ValueError(f"{rows} rows cannot be split evenly over {len(generator)} generators")
        noise = torch.cat([torch.randn(rows // len(generator), dim, generator=g) for g in generator])
    return noise.to(like)


PREDICTION_TYPES = ("epsilon", "v_prediction")


def _x0(out: torch.Tensor, x_t: torch.Tensor, acp_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 from the network output: eps (x0 = (x_t - sqrt(1 - acp) eps) / sqrt(acp), an eps error grows by
    1 / sqrt(acp) near t = T) or v (x0 = sqrt(acp) x_t - sqrt(1 - acp) v, Salimans & Ho 2022: bounded)."""
    if prediction_type == "v_prediction":
        return acp_t.sqrt() * x_t - (1 - acp_t).sqrt() * out
    return (x_t - (1 - acp_t).sqrt() * out) / acp_t.sqrt()


class DiffLoss(nn.Module):
    """Diffusion loss and sampler for tokens of size `token_dim` given z of size `z_dim`; the network predicts the
    noise ("epsilon", as the authors) or the velocity ("v_prediction"); training reuses each z for
    `diffusion_batch_mul` noise draws; sampling clamps the predicted x0 to +-`x0_clip` (None: no clamp)."""

    def __init__(self, token_dim: int, z_dim: int, depth: int = 3, width: int = 1024,
                 num_train_timesteps: int = 1000, diffusion_batch_mul: int = 4, x0_clip: float | None = 5.0,
                 prediction_type: str = "epsilon") -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.token_dim, self.diffusion_batch_mul, self.prediction_type = token_dim, diffusion_batch_mul, prediction_type
        self.net = AdaLNMLP(token_dim, z_dim, width, depth)
        # x0 clamp = DDPM's clip_denoised; tokens have unit variance, so 5 is a no-op for a good predictor
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule="cosine",
                                       variance_type="learned_range", clip_sample=x0_clip is not None,
                                       clip_sample_min=-(x0_clip or 0.0), clip_sample_max=x0_clip or 0.0)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone(), persistent=False)
        # saved with the weights, so a checkpoint is never sampled with the other parameterisation (float: EMA-safe)
        self.register_buffer("v_prediction", torch.tensor(float(prediction_type == "v_prediction")))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        """ValueError where the checkpoint's parameterisation differs from this head's."""
        saved = state_dict.get(prefix + "v_prediction")
        if saved is not None and bool(saved) != bool(self.v_prediction):
            trained = PREDICTION_TYPES[int(bool(saved))]
            raise ValueError(f"the MAR checkpoint was trained with prediction_type {trained!r}, the network is configured "
                             f"with {self.prediction_type!r}: set mar_def#prediction_type to {trained!r}")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over masked tokens of MSE(noise or velocity) + variational bound of the learned variance (bits per value).
        target (N, token_dim), z (N, z_dim), mask (N,) true/1 where the token is masked (None: all tokens)."""
        if mask is not None:
            target, z = target[mask.bool()], z[mask.bool()]  # only masked tokens carry a loss
        x0 = target.repeat(self.diffusion_batch_mul, 1)  # (M, token_dim)
        z = z.repeat(self.diffusion_batch_mul, 1)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(x0, noise, t)
        out, v = self.net(x_t, t, z).chunk(2, dim=1)
        goal = self.scheduler.get_velocity(x0, noise, t) if self.prediction_type == "v_prediction" else noise
        mse = (goal - out).pow(2).mean(dim=1)
        return (mse + self._variance_bound(x0, x_t, t, out.detach(), v)).mean()

    def _variance_bound(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor,
                        v: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) / log 2 per token (N,), trains only v (out is detached)."""
        # no term at t = 0: the sampler adds no noise at its last step (the authors' discretised-pixel likelihood
        # there assumes 8-bit images, not continuous latents)
        acp_t = self.alphas_cumprod[t][:, None]  # (N, 1)
        acp_prev = torch.where(t > 0, self.alphas_cumprod[(t - 1).clamp(min=0)], 1.0)[:, None]
        true_mean, beta, post_var = _posterior(x0, x_t, acp_t, acp_prev)
        post_var = post_var.clamp(min=1e-20)  # t = 0 has variance 0; keeps the masked-out branch finite
        mean, _, _ = _posterior(_x0(out, x_t, acp_t, self.prediction_type), x_t, acp_t, acp_prev)
        log_var, true_log_var = _learned_log_variance(v, beta, post_var), post_var.log()
        kl = 0.5 * (-1 + log_var - true_log_var + (true_log_var - log_var).exp()
                    + (true_mean - mean).pow(2) * (-log_var).exp())
        return torch.where(t > 0, kl.mean(dim=1) / math.log(2), 0.0)

    def _predict(self, x: torch.Tensor, t: int, z: torch.Tensor, cfg: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, D), z (n or 2n, Dz) -> output (eps or velocity), v (n, D); with cfg > 1, z = [cond; uncond] and the
        output is guided (linear in either parameterisation)."""
        guided = cfg > 1.0
        xx = torch.cat([x, x]) if guided else x
        out, v = self.net(xx, torch.full((xx.shape[0],), t, device=x.device), z).chunk(2, dim=1)
        if guided:
            out_cond, out_uncond = out.chunk(2)
            return out_uncond + cfg * (out_cond - out_uncond), v[: x.shape[0]]
        return out, v

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0, generator: Generators = None,
               num_inference_steps: int = 100) -> torch.Tensor:
        """Ancestral sampling over `num_inference_steps` steps -> (n, token_dim); z (N, z_dim) is [cond; uncond] for
        cfg > 1 (n = N / 2; ValueError if cfg < 1); `temperature` scales step noise; `generator`: one or per sample."""
        if cfg < 1.0:
            raise ValueError(f"cfg must be >= 1, got {cfg}")
        n = z.shape[0] // 2 if cfg > 1.0 else z.shape[0]
        self.scheduler.set_timesteps(num_inference_steps)
        steps = self.scheduler.timesteps.tolist()  # descending, e.g. 999, 989, ..., 0
        x = _randn(n, self.token_dim, generator, z)
        for t, prev in zip(steps, steps[1:] + [None]):
            out, v = self._predict(x, t, z, cfg)
            acp_t = self.alphas_cumprod[t]
            acp_prev = self.alphas_cumprod[prev] if prev is not None else torch.ones_like(acp_t)
            x0 = _x0(out, x, acp_t, self.prediction_type)
            if self.scheduler.clip_sample:  # with eps, 1 / sqrt(acp) is 2e4 at t = 999: a small error would explode
                x0 = x0.clamp(*self.scheduler.clip_sample_values)
            x, beta, post_var = _posterior(x0, x, acp_t, acp_prev)
            if prev is not None:
                std = (0.5 * _learned_log_variance(v, beta, post_var)).exp()
                x = x + temperature * std * _randn(n, self.token_dim, generator, z)
        return x
