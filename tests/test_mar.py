"""MAR transformer and per-token diffusion head: shapes, masking, training signal, guidance and per-sample seeds."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from scripts.generation.diffloss import DiffLoss
from scripts.generation.mar import MAR, Block, masking_schedule, patchify, sample_mask_ratios, unpatchify
from tests.networks import def_kwargs

LATENT = (16, 25, 12, 12)
N_PHEN = 5
FAST = {"num_iter": 4, "num_inference_steps": 8}  # a short decoding schedule for tiny-model sampling tests


def _tiny(seed: int = 0, randomise: bool = False, **kwargs) -> MAR:
    """Tiny MAR in eval mode; `randomise` perturbs every weight so that the zero-initialised head depends on z."""
    torch.manual_seed(seed)
    model = MAR(N_PHEN, **{**def_kwargs("mar_def", "tiny"), **kwargs})
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_patchify_round_trip() -> None:
    x = torch.randn(2, *LATENT)
    tokens = patchify(x, (5, 2, 2))
    assert tokens.shape == (2, 180, 320)
    torch.testing.assert_close(tokens[:, 0], x[:, :, :5, :2, :2].reshape(2, -1))  # first token = first patch
    torch.testing.assert_close(tokens[:, 1], x[:, :, :5, :2, 2:4].reshape(2, -1))  # then along W
    assert torch.equal(unpatchify(tokens, (5, 2, 2), LATENT), x)


def test_mask_ratio_sampler() -> None:
    r = sample_mask_ratios(200_000, generator=torch.Generator().manual_seed(0))
    assert r.min() >= 0.7 and r.max() <= 1.0
    expected = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25).mean()
    assert abs(expected - 0.867) < 1e-3
    assert abs(r.mean().item() - expected) < 2e-3
    assert abs(r.std().item() - stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25).std()) < 2e-3


@pytest.mark.parametrize("seq_len, num_iter", [(180, 16), (180, 1), (180, 180), (8, 6), (5, 5)])
def test_masking_schedule(seq_len: int, num_iter: int) -> None:
    counts = masking_schedule(seq_len, num_iter)
    revealed = [a - b for a, b in zip([seq_len] + counts, counts)]
    assert len(counts) == num_iter and counts[-1] == 0
    assert min(revealed) >= 1 and sum(revealed) == seq_len
    if (seq_len, num_iter) == (180, 16):  # floor(180 cos(pi/2 k/16)), as MAR
        assert counts == [179, 176, 172, 166, 158, 149, 139, 127, 114, 100, 84, 68, 52, 35, 17, 0]
    with pytest.raises(ValueError):
        masking_schedule(seq_len, seq_len + 1)


def test_forward_gradients() -> None:
    """Every parameter gets finite, non-zero gradients once the zero-initialised head output and modulations have
    moved (after two steps); the null embedding gets them through condition dropout."""
    model = _tiny(cond_drop_prob=0.5).train()
    x, ph = torch.randn(4, *LATENT), torch.randn(4, N_PHEN)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reached = set()
    for step in range(5):
        opt.zero_grad()
        loss = model(x, ph)
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        if step >= 2:
            reached |= {n for n, p in model.named_parameters() if p.grad.abs().sum() > 0}
        opt.step()
    assert reached == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_overfits_one_batch(prediction_type: str) -> None:
    model = _tiny(dropout=0.0, diffusion_batch_mul=1, prediction_type=prediction_type).train()
    x, ph = torch.randn(2, *LATENT), torch.randn(2, N_PHEN)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = model(x, ph)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


@pytest.mark.parametrize("steps", [100, 1000])
def test_head_sampler_on_gaussian_target(steps: int) -> None:
    """Exact noise predictor of x0 ~ N(0, 0.3^2): the respaced sampler gives std 0.3 (MONAI 1.6.1's `step` after
    `set_timesteps(100)`: 0.80); at 100 steps the learned range brackets it (v = -1 posterior, v = 1 beta)."""
    head = DiffLoss(4, 8, depth=1, width=8)
    sd, stds = 0.3, {}
    for v in (-1.0, 1.0):
        def oracle(x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, v: float = v) -> torch.Tensor:
            acp = head.alphas_cumprod[t][:, None]
            eps = (1 - acp).sqrt() * x / (acp * sd**2 + 1 - acp)
            return torch.cat([eps, torch.full_like(eps, v)], dim=1)

        head.net.forward = oracle
        x = head.sample(torch.zeros(20_000, 8), generator=torch.Generator().manual_seed(0), num_inference_steps=steps)
        stds[v] = x.std().item()
    if steps == 1000:
        assert abs(stds[-1.0] - sd) < 0.005 and abs(stds[1.0] - sd) < 0.005
    else:
        assert sd - 0.02 < stds[-1.0] < sd < stds[1.0] < sd + 0.01
        cold = head.sample(torch.zeros(20_000, 8), temperature=0.5, generator=torch.Generator().manual_seed(0))
        assert cold.std() < stds[1.0] - 0.02  # temperature scales the per-step noise


def test_cfg_and_condition() -> None:
    model = _tiny(randomise=True)
    ph, seeds = torch.randn(2, N_PHEN), [3, 4]
    out = model.sample_latents(ph, seeds=seeds, cfg=1.0, **FAST)
    assert out.shape == (2, *LATENT) and torch.isfinite(out).all()
    guided = model.sample_latents(ph, seeds=seeds, cfg=3.0, **FAST)
    uncond = model.sample_latents(None, seeds=seeds, cfg=3.0, **FAST)
    assert torch.isfinite(guided).all() and torch.isfinite(uncond).all()
    assert not torch.allclose(out, uncond) and not torch.allclose(out, guided)
    with torch.no_grad():
        model.null_cond.add_(1.0)  # the unconditional branch: unused at cfg = 1, used at cfg > 1
    assert torch.equal(model.sample_latents(ph, seeds=seeds, cfg=1.0, **FAST), out)
    assert not torch.allclose(model.sample_latents(ph, seeds=seeds, cfg=3.0, cfg_schedule="constant", **FAST),
                              model.sample_latents(ph, seeds=seeds, cfg=3.0, **FAST))


def test_per_sample_seeds() -> None:
    """Sample i of a batch = that sample alone with its seed: exact up to rounding (float64: < 1e-9); in float32
    the rounding of batched matrix products differs (~1e-7 relative), amplified by this random model's sampler
    (x0 = (x - eps) / 5e-5 at t = 999) into a few values near the x0 clamp: the mean difference stays tiny."""
    model = _tiny(randomise=True).double()
    ph, seeds = torch.randn(3, N_PHEN, dtype=torch.float64), [11, 12, 13]
    batch = model.sample_latents(ph, seeds=seeds, cfg=3.0, **FAST)
    for i, seed in enumerate(seeds):
        alone = model.sample_latents(ph[i:i + 1], seeds=[seed], cfg=3.0, **FAST)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-9, atol=1e-9)
    same_cond = model.sample_latents(ph[:1].expand(2, -1), seeds=[11, 14], cfg=3.0, **FAST)
    torch.testing.assert_close(same_cond[:1], batch[:1], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(same_cond[0], same_cond[1])
    generated = model.sample_latents(num_samples=2, generator=torch.Generator().manual_seed(0), **FAST)
    assert torch.equal(generated, model.sample_latents(num_samples=2, generator=torch.Generator().manual_seed(0),
                                                       **FAST))
    model, ph = model.float(), ph.float()
    batch = model.sample_latents(ph, seeds=seeds, cfg=3.0, **FAST)
    alone = model.sample_latents(ph[1:2], seeds=seeds[1:2], cfg=3.0, **FAST)
    assert (batch[1:2] - alone).abs().mean() <= 1e-4 * batch.abs().max()


@pytest.mark.slow
def test_paper_size_parameter_count() -> None:
    """Paper sizes (0.8 GB in fp32, a few seconds to build). Ours: 192.46M, the head 20.93M. The authors' model
    has 193.3M, 0.84M (0.4%) more: their code is the original MAR's, which also holds an `nn.Embedding(1000, 768)`
    class table (0.77M) that a phenotype model leaves unused; that would account for most of the gap."""
    model = MAR(82, **def_kwargs("mar_def", "paper"))
    n = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.diffloss.parameters())
    print(f"paper-size MAR: {n / 1e6:.2f}M parameters (diffusion head {head / 1e6:.2f}M)")
    assert abs(n - 193.3e6) / 193.3e6 < 0.05


def test_sampling_clamps_x0_so_an_imperfect_head_cannot_explode() -> None:
    """An untrained head predicts eps = 0: at t = 999, x0 = x / sqrt(2.4e-9) ~ 2e4 x. The clamp bounds the output
    (the last step returns x0); without it the samples blow up."""
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    clipped = DiffLoss(8, 16, depth=1, width=32).sample(z, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(clipped).all() and clipped.abs().max() <= 5.0
    raw = DiffLoss(8, 16, depth=1, width=32, x0_clip=None).sample(z, generator=torch.Generator().manual_seed(1))
    assert raw.abs().max() > 100.0


def _gaussian_oracle(head: DiffLoss, sd: float, shrink: float = 0.0):
    """The exact output (noise or velocity) for x0 ~ N(0, sd^2) per value, times 1 - `shrink`; variance value -1."""
    def oracle(x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        acp = head.alphas_cumprod[t][:, None]
        den = acp * sd**2 + 1 - acp
        eps, x0 = (1 - acp).sqrt() * x / den, acp.sqrt() * sd**2 * x / den  # E[eps | x_t], E[x0 | x_t]
        out = acp.sqrt() * eps - (1 - acp).sqrt() * x0 if head.prediction_type == "v_prediction" else eps
        return torch.cat([out * (1 - shrink), torch.full_like(out, -1.0)], dim=1)
    return oracle


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_velocity_prediction_tolerates_an_output_error_that_widens_noise_prediction(prediction_type: str) -> None:
    """An output 10% too small: with noise prediction x0 = (x - sqrt(1 - acp) eps) / sqrt(acp) errs by 0.1 x / sqrt(acp)
    (2e3 x at t = 999, clamped at 5) and the samples come out wider; with velocity prediction x0 barely moves."""
    head = DiffLoss(4, 8, depth=1, width=8, prediction_type=prediction_type)
    stds = {}
    for shrink in (0.0, 0.1):
        head.net.forward = _gaussian_oracle(head, 1.0, shrink)
        x = head.sample(torch.zeros(4000, 8), generator=torch.Generator().manual_seed(0), num_inference_steps=25)
        stds[shrink] = x.std().item()
    assert abs(stds[0.0] - 0.92) < 0.03  # 25 respaced steps at the posterior variance (v = -1): a little narrow
    if prediction_type == "v_prediction":
        assert abs(stds[0.1] - stds[0.0]) < 0.005
    else:
        assert stds[0.1] - stds[0.0] > 0.08


def test_a_checkpoint_is_never_sampled_with_the_other_parameterisation() -> None:
    eps_head, v_head = DiffLoss(4, 8, depth=1, width=8), DiffLoss(4, 8, depth=1, width=8, prediction_type="v_prediction")
    v_head.load_state_dict(DiffLoss(4, 8, depth=1, width=8, prediction_type="v_prediction").state_dict())
    with pytest.raises(ValueError, match="trained with prediction_type 'epsilon'"):
        v_head.load_state_dict(eps_head.state_dict())
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DiffLoss(4, 8, prediction_type="x0")
    target, z = torch.randn(6, 4), torch.randn(6, 8)
    assert torch.isfinite(v_head.loss(target, z)) and torch.isfinite(eps_head.loss(target, z))


def test_head_condition_adds_the_condition_to_every_token() -> None:
    """head_condition: z of every token = the decoder's output + the condition embedding (null when dropped or
    unconditional), so the per-token head sees the phenotypes directly; off, z does not depend on it beyond attention."""
    model = _tiny(randomise=True)
    tokens, mask = torch.randn(2, model.seq_len, model.token_dim), torch.ones(2, model.seq_len, dtype=torch.bool)
    cond = model._condition(torch.randn(2, N_PHEN), 2)
    encoded = model._encode(tokens, mask, cond)
    with torch.no_grad():
        model.head_condition = False
        plain = model._decode(encoded, mask, cond)
        model.head_condition = True
        torch.testing.assert_close(model._decode(encoded, mask, cond) - plain, cond[:, None].expand_as(plain))


def test_adaptive_norm_starts_as_the_plain_block_and_carries_the_condition() -> None:
    """adaptive_norm: zero-initialised modulations leave every block equal to the plain one at the start; once they
    move, the condition reaches the tokens through the norms alone (no buffer positions, no head condition), which the
    plain model cannot do."""
    torch.manual_seed(0)
    plain, adaptive = Block(16, 2, 2.0, 0.0).eval(), Block(16, 2, 2.0, 0.0, adaptive=True).eval()
    nn_init = MAR(N_PHEN, **{**def_kwargs("mar_def", "tiny"), "adaptive_norm": True})
    assert all(not b.ada[-1].weight.any() and not b.ada[-1].bias.any()
               for b in (*nn_init.encoder_blocks, *nn_init.decoder_blocks))
    adaptive.load_state_dict({**adaptive.state_dict(), **plain.state_dict(),
                              **{f"ada.1.{k}": torch.zeros_like(v) for k, v in adaptive.ada[1].state_dict().items()}})
    x, cond = torch.randn(2, 7, 16), torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(adaptive(x, cond), plain(x))
    tokens, mask = torch.randn(2, nn_init.seq_len, nn_init.token_dim), torch.ones(2, nn_init.seq_len, dtype=torch.bool)
    mask[:, :3] = False
    ph = torch.randn(2, N_PHEN)
    for adaptive_norm in (False, True):
        model = _tiny(randomise=True, buffer_size=0, head_condition=False, adaptive_norm=adaptive_norm)
        with torch.no_grad():
            z = [model._decode(model._encode(tokens, mask, c), mask, c) for c in (model._condition(ph, 2),
                                                                                 model._condition(None, 2))]
        assert torch.allclose(z[0], z[1]) != adaptive_norm
