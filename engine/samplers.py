"""Our samplers: DDPM (learned-range variance, dynamic thresholding), DDIM (eta = 0) and DPM-Solver++ (2M).

Each sampler is built once per stage run from a diffusers scheduler config and a step count or timestep list.
Everything that depends only on the step index is precomputed here as a float32 tensor on the device, so a
step is pure tensor arithmetic: no Python branching on tensor values, no host sync, no allocation beyond the
arithmetic itself, and the same code can be captured in a CUDA graph. Results agree with diffusers'
`DDPMScheduler`, `DDIMScheduler` and `DPMSolverMultistepScheduler` to float32 rounding (tests/test_samplers.py).

Contract shared by all samplers (resolved once, before the loop):
    timesteps      (N,) int64 on device: the U-Net's timestep at each step
    noise_steps    N bools, host-side: whether step i consumes a fresh standard-normal tensor shaped like the
                   sample (the stage draws them all up front, in diffusers' generator order)
    start(sample, first)  reset per-run state (DPM-Solver's previous x0) before step `first` (0, or an edit's
                   first step: a multistep solver's first step there is first order, as diffusers' with
                   set_begin_index)
    step(i, eps, variance, sample, noise) -> next sample
        i          the step index: a Python int, or a (1,) int64 tensor on the device (see `at`)
        eps        (B, C, H, W) the model's prediction (epsilon, v or x0, per the config's prediction_type)
        variance   (B, C, H, W) the learned-range interpolation channels, or None
        sample     (B, C, H, W) float32, x_t
        noise      (B, C, H, W) or None, the standard normal for this step when noise_steps[i]; zeros where
                   it takes none give the same result (the fast path passes a tensor at every step)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from engine.schedules import NoiseSchedule, spaced_timesteps

# diffusers' defaults for the config keys each sampler reads (what `Scheduler.from_config` fills in).
_COMMON = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "thresholding": False,
    "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "steps_offset": 0,
}
# Options diffusers offers that these samplers do not implement: a config that turns one on is refused.
_UNSUPPORTED = {
    "rescale_betas_zero_snr": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
}


def resolve_config(kind: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The config a diffusers scheduler of this kind would run with: its defaults, overridden by `config`."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown sampler {kind!r}; known: {', '.join(SAMPLERS)}")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) != default:
            raise ValueError(f"scheduler option {key}={config[key]!r} is not supported by our {kind} sampler")
    # Keys a diffusers-resolved config holds only as its own class's defaults give way to this kind's defaults.
    defaulted = set(config.get("_use_default_values", ()))
    resolved = {key: config[key] if key in config and key not in defaulted else default
                for key, default in REGISTRY[kind].defaults.items()}
    checks = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("leading", "trailing", "linspace"),
    }
    if kind == "ddpm":
        checks["variance_type"] = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
    if kind == "dpm++2m":
        checks |= {"algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint",), "solver_order": (1, 2),
                   "final_sigmas_type": ("zero", "sigma_min")}
    for key, allowed in checks.items():
        if resolved[key] not in allowed:
            raise ValueError(f"scheduler option {key}={resolved[key]!r} is not supported by our {kind} sampler; "
                             f"supported: {', '.join(map(str, allowed))}")
    return resolved


def build_sampler(kind: str, config: Mapping[str, Any], steps: int | Sequence[int], device: torch.device | str = "cpu"):
    """A sampler of `kind` ("ddpm", "ddim", "dpm++2m") for a scheduler config and a step count or timestep list."""
    cfg = resolve_config(kind, config)
    return REGISTRY[kind].implementation(cfg, steps, torch.device(device))


def _timesteps(cfg: Mapping[str, Any], steps: int | Sequence[int]) -> list[int]:
    num_train = cfg["num_train_timesteps"]
    if isinstance(steps, int):
        if not 1 <= steps <= num_train:
            raise ValueError(f"steps must be in 1..{num_train}, got {steps}")
        return spaced_timesteps(num_train, steps, cfg["timestep_spacing"], cfg["steps_offset"])
    ts = [int(t) for t in steps]
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[0] >= num_train or ts[-1] < 0:
        raise ValueError(f"a timestep list must be non-empty, strictly descending and within 0..{num_train - 1}")
    return ts


def at(table: torch.Tensor, i) -> torch.Tensor:
    """table[i] for a step index that is a Python int, or a (1,) int64 tensor on the table's device (the fast
    path's step counter): then an index_select, so no value crosses to the host and one captured step serves
    every step. Either broadcasts against (B, C, H, W)."""
    return table[i] if isinstance(i, int) else table.index_select(0, i)


def _table(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32, device=device)


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: clamp each sample to its `ratio` quantile of |x0| (at least 1), rescale."""
    flat = x0.reshape(x0.shape[0], -1)  # (B, C*H*W)
    s = upper_quantile(flat.abs(), ratio).clamp(1, max_value).unsqueeze(1)  # (B, 1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape)


def upper_quantile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(flat, q, dim=1) (linear interpolation), bit for bit, from the top ranks only.

    torch.quantile sorts each whole row; a high quantile needs only the largest n - floor(q (n - 1)) values
    (246 of 49,152 at q = 0.995 on a 128x128 image), which topk finds 5-25x faster on CPU. The rank and the
    interpolation weight are computed as torch.quantile does, in the input's precision, but on the host as
    Python numbers: no tensor per step, nothing for a CUDA input to wait on.
    """
    n = flat.shape[1]
    real = np.float64 if flat.dtype == torch.float64 else np.float32  # torch.quantile takes float32/float64
    rank = real(q) * real(n - 1)
    below = np.floor(rank)
    top = n - int(below)  # values of rank floor(rank) .. n - 1
    values = flat.topk(top, dim=1, sorted=True).values  # (B, top), descending; a NaN ranks first
    quantile = torch.lerp(values[:, top - 1], values[:, max(top - 2, 0)], float(rank - below))
    return torch.where(values[:, 0].isnan(), values[:, 0], quantile)  # NaN for a row with one, as torch.quantile


class _Sampler:
    """Shared pieces: the schedule, the x0 prediction and its clipping."""

    def __init__(self, cfg: Mapping[str, Any], timesteps: list[int], device: torch.device):
        self.config = dict(cfg)
        self.schedule = NoiseSchedule.from_config(cfg)
        self.device = device
        self.timesteps = torch.tensor(timesteps, dtype=torch.int64, device=device)  # (N,)
        self.noise_steps = [False] * len(timesteps)
        self.init_noise_sigma = 1.0

    def __len__(self) -> int:
        return len(self.noise_steps)

    def start(self, sample: torch.Tensor, first: int = 0) -> None:
        """Reset per-run state before step `first` (nothing to reset for single-step samplers)."""

    def load(self, other: "_Sampler") -> None:
        """Take another run's tables and state (same kind, config and step count) into this sampler's own
        tensors, in place: the fast path's captured step keeps reading this sampler's memory."""
        for name, value in vars(other).items():
            if isinstance(value, torch.Tensor):
                getattr(self, name).copy_(value)

    def _x0_and_eps(self, out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """(x0, eps) from the model output at noise level x = alpha * x0 + sigma * eps."""
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return (x - sigma * out) / alpha, out
        if kind == "v_prediction":
            return alpha * x - sigma * out, alpha * out + sigma * x
        return out, (x - alpha * out) / sigma  # "sample"

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg["thresholding"]:
            return dynamic_threshold(x0, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
        if cfg.get("clip_sample"):
            return x0.clamp(-cfg["clip_sample_range"], cfg["clip_sample_range"])
        return x0


class DDPMSampler(_Sampler):
    """Ancestral DDPM: x_{t'} = c0 * x0 + c1 * x_t + std * z, with t' the next timestep in the list."""

    def __init__(self, cfg, steps, device):
        ts = _timesteps(cfg, steps)
        super().__init__(cfg, ts, device)
        variance_type = cfg["variance_type"]
        self.learned_range = variance_type == "learned_range"
        # Each step's constants as diffusers' DDPMScheduler.step and _get_variance compute them: float32, op for op
        # in their order (`** 0.5`, not sqrt), here over every step at once (elementwise, so the same bits as
        # their one step at a time; checked over 2..250 steps). Computed in float64 and rounded once, they
        # differed in the last bit, and a few ulps a step added up to 2-4e-5 over a 27 + 27-step cascade
        # (README, "Reproducibility"; tests/test_parity_seeds.py).
        acp = self.schedule.alphas_cumprod  # (T,) float32, as diffusers keeps it
        prev = torch.tensor([*ts[1:], -1])
        a_t = acp[torch.tensor(ts)]
        a_prev = torch.where(prev >= 0, acp[prev.clamp(min=0)], torch.ones(()))  # t' past the end: alpha 1
        beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
        alpha = a_t / a_prev
        beta = 1 - alpha  # the step's own beta between t and t'
        var = torch.clamp((1 - a_prev) / (1 - a_t) * beta, min=1e-20)  # posterior variance, clamped as theirs
        self.sqrt_alpha = (a_t ** 0.5).to(device)
        self.sqrt_one_minus_alpha = (beta_prod_t ** 0.5).to(device)
        self.coef_x0 = ((a_prev ** 0.5 * beta) / beta_prod_t).to(device)
        self.coef_xt = (alpha ** 0.5 * beta_prod_prev / beta_prod_t).to(device)
        self.min_log = torch.log(var).to(device)  # learned range: log-variance between these two
        self.max_log = torch.log(beta).to(device)
        self.fixed_std = ((beta if variance_type == "fixed_large" else var) ** 0.5).to(device)
        self.noise_steps = [t > 0 for t in ts]

    def step(self, i, eps, variance, sample, noise):
        x0, _ = self._x0_and_eps(eps, sample, at(self.sqrt_alpha, i), at(self.sqrt_one_minus_alpha, i))
        x0 = self._clip(x0)
        mean = at(self.coef_x0, i) * x0 + at(self.coef_xt, i) * sample
        if noise is None:
            return mean
        if self.learned_range:
            frac = (variance + 1) / 2  # (B, C, H, W) in [0, 1]: where between the two log-variances
            std = torch.exp(0.5 * (frac * at(self.max_log, i) + (1 - frac) * at(self.min_log, i)))
        else:
            std = at(self.fixed_std, i)
        return mean + std * noise


class DDIMSampler(_Sampler):
    """Deterministic DDIM (eta = 0): x_{t'} = sqrt(a') * x0 + sqrt(1 - a') * eps.

    For a step count t' = t - T // N, as diffusers computes it; for an explicit timestep list (which diffusers'
    DDIM does not take) t' is the next timestep in the list, as in DDPM.
    """

    def __init__(self, cfg, steps, device):
        ts = _timesteps(cfg, steps)
        super().__init__(cfg, ts, device)
        acp = self.schedule.alphas_cumprod.double().numpy()
        final = 1.0 if cfg["set_alpha_to_one"] else acp[0]
        if isinstance(steps, int):
            stride = cfg["num_train_timesteps"] // len(ts)
            prev = [t - stride for t in ts]
        else:
            prev = ts[1:] + [-1]
        a_t = acp[ts]
        a_prev = np.array([acp[p] if p >= 0 else final for p in prev])
        self.sqrt_alpha = _table(np.sqrt(a_t), device)
        self.sqrt_one_minus_alpha = _table(np.sqrt(1 - a_t), device)
        self.sqrt_alpha_prev = _table(np.sqrt(a_prev), device)
        self.sqrt_one_minus_alpha_prev = _table(np.sqrt(1 - a_prev), device)

    def step(self, i, eps, variance, sample, noise):
        x0, eps = self._x0_and_eps(eps, sample, at(self.sqrt_alpha, i), at(self.sqrt_one_minus_alpha, i))
        x0 = self._clip(x0)  # the direction term keeps the unclipped eps, as diffusers does by default
        return at(self.sqrt_alpha_prev, i) * x0 + at(self.sqrt_one_minus_alpha_prev, i) * eps


class DPMSolverPlusPlus2M(_Sampler):
    """DPM-Solver++ (2M, midpoint), data prediction: x_{t'} = a * x_t + b * x0_i + c * (x0_i - x0_{i-1}).

    The first-order (DDIM-like) and second-order updates are both linear in x_t, x0_i and the x0 difference,
    with per-step coefficients; c = 0 where the solver falls back to first order (the first step, and the last
    one as diffusers' lower_order_final does). The difference is kept as one term because near-equal timesteps
    (IF's smart27 has 858 then 857) make its coefficient 1 / r0 large. The coefficients are computed in float32
    with diffusers' formulas, so their rounding matches too.
    """

    def __init__(self, cfg, steps, device):
        acp = NoiseSchedule.from_config(cfg).alphas_cumprod  # (T,) float32
        if isinstance(steps, int):
            _timesteps(cfg, steps)  # validates the step count
            # diffusers stops at the timestep where lambda falls below lambda_min_clipped.
            lambdas = 0.5 * np.log(acp.double().numpy() / (1 - acp.double().numpy()))
            clipped = int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
            last = cfg["num_train_timesteps"] - clipped
            spacing = cfg["timestep_spacing"]
            if spacing == "linspace":
                ts = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
            elif spacing == "leading":
                ts = (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + cfg["steps_offset"]
            else:
                ts = np.arange(last, 0, -cfg["num_train_timesteps"] / steps).round() - 1
            steps = [int(t) for t in ts]
        ts = _timesteps(cfg, steps)
        super().__init__(cfg, ts, device)
        ve = ((1 - acp) / acp) ** 0.5  # (T,) VE noise level sigma / alpha per training step, float32
        last_sigma = ve[0].item() if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        s = torch.cat([ve[ts], torch.tensor([last_sigma])])  # (N + 1,) float32
        alpha = 1 / (s**2 + 1) ** 0.5
        sigma = s * alpha
        lam = torch.log(alpha) - torch.log(sigma)  # log-SNR / 2; +inf at a final sigma of 0
        n = len(ts)
        final_first_order = cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) \
            or cfg["final_sigmas_type"] == "zero"
        a, b, c = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        for i in range(n):
            h = lam[i + 1] - lam[i]
            e = alpha[i + 1] * (torch.exp(-h) - 1.0)
            a[i], b[i] = sigma[i + 1] / sigma[i], -e
            if not (cfg["solver_order"] == 1 or i == 0 or (i == n - 1 and final_first_order)):
                r0 = (lam[i] - lam[i - 1]) / h
                c[i] = -0.5 * e * (1.0 / r0)
        self.alpha, self.sigma = alpha[:-1].to(device), sigma[:-1].to(device)
        self.coef_xt, self.coef_x0, self.coef_dx0 = a.to(device), b.to(device), c.to(device)
        self._prev_x0: torch.Tensor | None = None

    def start(self, sample, first=0):
        self._prev_x0 = torch.zeros_like(sample)  # x0 of the previous step; its coefficient is 0 at step 0
        self.coef_dx0[first] = 0.0  # an edit's first step has no previous x0 either: first order there

    def step(self, i, eps, variance, sample, noise):
        x0, _ = self._x0_and_eps(eps, sample, at(self.alpha, i), at(self.sigma, i))
        x0 = self._clip(x0)
        out = at(self.coef_xt, i) * sample + at(self.coef_x0, i) * x0 + at(self.coef_dx0, i) * (x0 - self._prev_x0)
        self._prev_x0.copy_(x0)
        return out


@dataclass(frozen=True)
class SamplerKind:
    """One sampler of the registry."""

    scheduler_class: str  # the diffusers scheduler it reproduces (a scheduler config's _class_name)
    defaults: dict  # that class's defaults for the config keys the sampler reads
    implementation: type


# The one registry of samplers, by the name a request gives (GenerateRequest.scheduler).
REGISTRY = {
    "ddpm": SamplerKind("DDPMScheduler", {**_COMMON, "variance_type": "fixed_small", "clip_sample": True,
                                          "clip_sample_range": 1.0, "timestep_spacing": "leading"}, DDPMSampler),
    "ddim": SamplerKind("DDIMScheduler", {**_COMMON, "clip_sample": True, "clip_sample_range": 1.0,
                                          "set_alpha_to_one": True, "timestep_spacing": "leading"}, DDIMSampler),
    "dpm++2m": SamplerKind("DPMSolverMultistepScheduler", {
        **_COMMON, "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
        "lower_order_final": True, "euler_at_final": False, "final_sigmas_type": "zero", "variance_type": None,
        "timestep_spacing": "linspace", "lambda_min_clipped": -math.inf}, DPMSolverPlusPlus2M),
}
SAMPLERS = tuple(REGISTRY)
SCHEDULER_CLASSES = {kind.scheduler_class: name for name, kind in REGISTRY.items()}  # diffusers class -> ours
