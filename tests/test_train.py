"""Training the shapes cascade (engine/demo/train.py): the loss's arithmetic, the data split, a seeded run that
reproduces itself and loads back into the engine."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import engine
from engine.demo.evaluate import held_out_scenes
from engine.testing.random_models import IF_I_SCHEDULER, TinyCascadeSpec
from engine.demo.shapes import caption
from engine.demo.train import (
    HybridLoss,
    TrainOptions,
    all_scenes,
    prepare,
    train_stage,
    training_scenes,
)


def test_training_scenes_are_the_whole_grammar_but_the_held_out_captions():
    assert len(set(all_scenes())) == 3 * 9 * 8 * 2 * 9  # shapes, colours, other backgrounds, sizes, positions
    held_out = set(held_out_scenes(64))
    scenes = training_scenes(64)
    assert not held_out & set(scenes)
    assert len(set(scenes)) == len(scenes) == len(all_scenes()) - len(held_out)


class _Oracle(torch.nn.Module):
    """A stand-in U-Net that knows x0: it answers the exact eps (or v), and `v` in every variance channel."""

    def __init__(self, x0, loss, v, offset=0.0):
        super().__init__()
        self.x0, self.loss, self.v = x0, loss, v
        self.offset = torch.nn.Parameter(torch.tensor(offset))

    def forward(self, sample, t, encoder_hidden_states=None, class_labels=None):
        view = (-1, 1, 1, 1)
        alpha, sigma = self.loss.sqrt_acp[t].view(view), self.loss.sqrt_one_minus[t].view(view)
        eps = (sample - alpha * self.x0) / sigma
        pred = alpha * eps - sigma * self.x0 if self.loss.prediction_type == "v_prediction" else eps
        return SimpleNamespace(sample=torch.cat([pred + self.offset, torch.full_like(eps, self.v)], dim=1))


@pytest.fixture(params=["epsilon", "v_prediction"])
def hybrid(request):
    return HybridLoss({**IF_I_SCHEDULER, "prediction_type": request.param})


def test_hybrid_loss_is_zero_only_for_the_true_prediction_and_the_true_posterior_variance(hybrid):
    x0 = torch.rand(64, 3, 8, 8) * 2 - 1
    embeddings = torch.zeros(64, 4, 8)

    def loss(v, offset=0.0):
        return hybrid(_Oracle(x0, hybrid, v, offset), x0, embeddings, torch.Generator().manual_seed(0)).item()

    assert abs(loss(-1.0)) < 1e-6  # v = -1 is the posterior variance: the true reverse step's
    # v = +1 is beta_t: too wide, and the bound says so (beta_t is near the posterior variance but at small t).
    assert loss(1.0) > 1e-5
    assert loss(-1.0, offset=0.1) >= 0.01  # a wrong prediction costs its squared error (and more in the bound)


def test_the_bound_trains_the_variance_not_the_mean(hybrid):
    # The mean's gradient comes from the MSE alone (Improved DDPM holds it fixed in the bound).
    x0 = torch.rand(16, 3, 8, 8) * 2 - 1
    oracle = _Oracle(x0, hybrid, 0.3, offset=0.2)
    hybrid(oracle, x0, torch.zeros(16, 4, 8), torch.Generator().manual_seed(1)).backward()
    assert oracle.offset.grad.item() == pytest.approx(2 * 0.2, rel=1e-4)  # d/d offset of offset**2


SPEC = TinyCascadeSpec(base_channels=(16, 32), sr_channels=(16, 32), cross_attention_dim=32, head_dim=16)


def _train(root, scenes):
    options = TrainOptions(seed=3, steps=(3, 3), batch=(4, 4), warmup=2)
    data = prepare(root, options, spec=SPEC, scenes=scenes)
    for stage in ("I", "II"):
        train_stage(root, stage, data, options, log=lambda message: None)
    return root


def test_a_seeded_run_reproduces_itself_and_loads_into_the_engine(tmp_path):
    scenes = training_scenes(64)[:24]
    first, second = _train(tmp_path / "a", scenes), _train(tmp_path / "b", scenes)
    weights = "stage_II/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(first / weights), load_file(second / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)
    pipe = engine.load(first, device="cpu")
    image = pipe.generate(caption(scenes[0]), steps=(2, 2), output_type="np")
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_a_time_budget_cuts_the_steps_to_it(tmp_path):
    # 1000 steps asked for, 0.6 s allowed: the steps are fitted to the budget after TIMING_STEPS, or the stage
    # stops once past OVERRUN x the budget (on a slow or busy machine, before the timing ends).
    options = TrainOptions(seed=3, steps=(1000, 1000), batch=(2, 2), warmup=200, minutes=0.01)
    data = prepare(tmp_path, options, spec=SPEC, scenes=training_scenes(64)[:24])
    messages = []
    report = train_stage(tmp_path, "I", data, options, log=messages.append)
    assert report["steps"] < 1000, messages
    assert any("fit in 0.01 min" in m or "its 0.01 min" in m for m in messages), messages
    assert (tmp_path / "stage_I" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_training_changes_the_weights(tmp_path):
    from engine.testing.random_models import write_if_cascade

    untrained = write_if_cascade(tmp_path / "untrained", SPEC, seed=3)
    trained = _train(tmp_path / "trained", training_scenes(64)[:24])
    weights = "stage_I/unet/diffusion_pytorch_model.safetensors"
    before, after = load_file(untrained / weights), load_file(trained / weights)
    assert any(not torch.equal(before[k], after[k]) for k in before)
