"""Our samplers against diffusers' scheduler classes, step by step, on random model outputs."""

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.pipelines.deepfloyd_if import timesteps as if_timesteps

from engine.samplers import build_sampler, dynamic_threshold, upper_quantile
from engine.schedules import NAMED_SCHEDULES, named_timesteps, spaced_timesteps

# IF-I-XL's and IF-II-L's scheduler configs (engine/configs/real_size.json) and a plain SD-like one.
IF_I = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000, "variance_type": "learned_range",
        "prediction_type": "epsilon", "thresholding": True, "dynamic_thresholding_ratio": 0.95,
        "sample_max_value": 1.5, "clip_sample": True, "clip_sample_range": 1.0}
IF_II = {**IF_I, "sample_max_value": 1.0}
PLAIN = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
         "variance_type": "fixed_small"}


def run_both(ours, theirs, timesteps_kwargs, learned, seed):
    """Feed the same random model outputs to both, step by step; return the worst difference seen, relative to
    the sample's magnitude (float32 rounding grows with it when nothing clips x0)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 3, 8, 8)
    x_ours = x_theirs = torch.randn(shape, generator=gen) * 1.5
    theirs.set_timesteps(**timesteps_kwargs)
    assert torch.equal(ours.timesteps, theirs.timesteps.to(torch.int64))
    ours.start(x_ours)
    worst = 0.0
    for i, t in enumerate(theirs.timesteps):
        eps = torch.randn(shape, generator=gen) * 2.0
        var = torch.rand(shape, generator=gen) * 2 - 1
        model_output = torch.cat([eps, var], 1) if learned else eps
        noise_seed = 1000 + i
        # diffusers draws its noise from the generator inside step(); we give ours the same draw explicitly.
        x_theirs = theirs.step(model_output, t, x_theirs, generator=torch.Generator().manual_seed(noise_seed),
                               return_dict=False)[0]
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed)) if ours.noise_steps[i] else None
        x_ours = ours.step(i, eps, var if learned else None, x_ours, noise)
        worst = max(worst, ((x_ours - x_theirs).abs().max() / (1 + x_theirs.abs().max())).item())
    assert torch.isfinite(x_ours).all()
    return worst


@pytest.mark.parametrize("config", [IF_I, IF_II, PLAIN], ids=["if-i", "if-ii", "plain"])
@pytest.mark.parametrize("steps", [1, 7, 27, "smart27", "smart50"])
def test_ddpm_matches_diffusers(config, steps):
    theirs = DDPMScheduler.from_config(config)
    ts = named_timesteps(steps) if isinstance(steps, str) else steps
    ours = build_sampler("ddpm", config, ts)
    kwargs = {"timesteps": ts} if isinstance(ts, list) else {"num_inference_steps": ts}
    learned = config.get("variance_type") == "learned_range"
    assert run_both(ours, theirs, kwargs, learned, seed=len(str(steps))) < 5e-5


@pytest.mark.parametrize("config", [IF_I, PLAIN, {**PLAIN, "prediction_type": "v_prediction",
                                                  "timestep_spacing": "trailing"}], ids=["if-i", "plain", "v"])
@pytest.mark.parametrize("steps", [1, 10, 27])
def test_ddim_matches_diffusers(config, steps):
    theirs = DDIMScheduler.from_config(config)
    ours = build_sampler("ddim", config, steps)
    assert run_both(ours, theirs, {"num_inference_steps": steps}, learned=False, seed=steps) < 5e-5


@pytest.mark.parametrize("config", [IF_I, IF_II, PLAIN, {**PLAIN, "timestep_spacing": "leading"},
                                    {**PLAIN, "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}],
                         ids=["if-i", "if-ii", "plain", "leading", "trailing-sigma-min"])
@pytest.mark.parametrize("steps", [1, 2, 10, 20, "smart27"])
def test_dpm_solver_matches_diffusers(config, steps):
    theirs = DPMSolverMultistepScheduler.from_config(config)
    ts = named_timesteps(steps) if isinstance(steps, str) else steps
    ours = build_sampler("dpm++2m", config, ts)
    kwargs = {"timesteps": ts} if isinstance(ts, list) else {"num_inference_steps": ts}
    # diffusers' DPM-Solver drops the variance channels itself when variance_type is learned_range.
    learned = theirs.config.variance_type in ("learned", "learned_range")
    assert run_both(ours, theirs, kwargs, learned, seed=3) < 5e-5


def test_a_wrong_step_would_be_caught():
    # The comparison above must be able to fail: a sampler fed different outputs drifts far from diffusers.
    theirs = DDPMScheduler.from_config(IF_I)
    ours = build_sampler("ddpm", IF_I, 10)
    ours.step = lambda i, eps, var, x, noise, _step=ours.step: _step(i, eps * 1.01, var, x, noise)
    assert run_both(ours, theirs, {"num_inference_steps": 10}, learned=True, seed=0) > 1e-3


def test_ddim_with_a_timestep_list_steps_to_the_next_listed_timestep():
    # diffusers' DDIM takes no list; for an evenly spaced "leading" list, t - T // N is the next listed
    # timestep, so the list form must give exactly what the step-count form gives.
    by_count = build_sampler("ddim", IF_I, 10)
    by_list = build_sampler("ddim", IF_I, by_count.timesteps.tolist())
    assert torch.equal(by_count.sqrt_alpha_prev, by_list.sqrt_alpha_prev)


@pytest.mark.parametrize("name", sorted(NAMED_SCHEDULES))
def test_named_schedules_match_deepfloyd_lists(name):
    assert named_timesteps(name) == list(getattr(if_timesteps, f"{name}_timesteps"))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 27, 100, 1000])
def test_spaced_timesteps_match_diffusers(spacing, steps):
    theirs = DDPMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    theirs.set_timesteps(steps)
    ours = spaced_timesteps(1000, steps, spacing, offset=theirs.config.steps_offset)
    assert ours == theirs.timesteps.tolist()


@pytest.mark.parametrize("q", [0.0, 0.5, 0.95, 0.995, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 3 * 32 * 32), (2, 3 * 128 * 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upper_quantile_is_torch_quantile_bit_for_bit(q, shape, dtype):
    generator = torch.Generator().manual_seed(0)
    flat = (torch.randn(shape, generator=generator, dtype=dtype) * 3).abs()
    flat[:, ::5] = flat[:, ::5].round()  # ties
    assert torch.equal(upper_quantile(flat, q), torch.quantile(flat, q, dim=1))
    flat[0, -1] = float("nan")  # an overflowed row gives NaN, the others their quantile
    torch.testing.assert_close(upper_quantile(flat, q), torch.quantile(flat, q, dim=1), rtol=0, atol=0, equal_nan=True)


def test_dynamic_threshold_matches_diffusers():
    x0 = torch.randn(4, 3, 16, 16) * 3
    theirs = DDPMScheduler.from_config(IF_I)._threshold_sample(copy.deepcopy(x0))
    assert torch.allclose(dynamic_threshold(x0, 0.95, 1.5), theirs, atol=1e-6)


@pytest.mark.parametrize("kind,config,steps,message", [
    ("ddpm", IF_I, 0, "steps must be in 1..1000"),
    ("ddpm", IF_I, 1001, "steps must be in 1..1000"),
    ("ddpm", IF_I, [5, 10], "strictly descending"),
    ("ddpm", {**IF_I, "variance_type": "learned"}, 10, "variance_type='learned' is not supported"),
    ("dpm++2m", {"use_karras_sigmas": True}, 10, "use_karras_sigmas=True is not supported"),
    ("euler", IF_I, 10, "unknown sampler 'euler'"),
])
def test_bad_sampler_requests_are_refused(kind, config, steps, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_sampler(kind, config, steps)
