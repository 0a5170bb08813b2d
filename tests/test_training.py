"""Tests of CFM training: the loss and its minimiser, time sampling, EMA, schedules, data order, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowmatch.gaussian import GaussianPath
from flowmatch.models import build_model
from flowmatch.schedules import get_schedule
from flowmatch.training import (
    EMA,
    SINGULAR_TIME_MARGIN,
    BatchOrder,
    NonFiniteLossError,
    Trainer,
    TrainSettings,
    cfm_loss,
    load_model_file,
    load_velocity_model,
    make_adamw,
    max_training_time,
    model_file_contents,
    model_velocity,
    sample_time,
    schedule_config,
    shard,
    step_generator,
    warmup_cosine_factor,
)

MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
MLP_CONFIG = {"kind": "mlp", "shape": [2], "hidden": 32, "layers": 2, "time_dim": 8}


@pytest.fixture(autouse=True)
def _one_thread():
    """Run on one CPU thread: these models are too small to gain from more, and idle threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``z ~ N(MEAN, COV)``, ``eps ~ N(0, I)`` and ``t ~ U(0, 1)`` in float64."""
    generator = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(COV)
    z = MEAN + torch.randn(n, 2, generator=generator, dtype=torch.float64) @ chol.T
    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    t = torch.rand(n, generator=generator, dtype=torch.float64)
    return z, eps, t


def settings(**overrides) -> TrainSettings:
    values = dict(steps=40, batch_size=64, lr=1e-2, warmup_steps=5, grad_clip=1.0, ema_decay=0.9)
    values.update(overrides)
    return TrainSettings(**values)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_loss_excess_is_distance_to_marginal(name):
    # CFM loss = E|v - u_t(x)|^2 / d + a constant, so shifting the exact marginal velocity
    # u_t by a constant c raises the loss by |c|^2 / d (d = 2 here).
    schedule = get_schedule(name)
    path = GaussianPath(MEAN, COV, schedule)
    z, eps, t = gaussian_batch(200_000, seed=0)
    shift = torch.tensor([0.3, -0.2], dtype=torch.float64)

    optimum = float(cfm_loss(path.velocity, z, eps, t, schedule))
    shifted = float(cfm_loss(lambda x, s: path.velocity(x, s) + shift, z, eps, t, schedule))
    assert shifted - optimum == pytest.approx(float(shift @ shift) / 2, rel=0.1)


def test_loss_at_optimum_below_random_model():
    schedule = get_schedule("cosine")
    path = GaussianPath(MEAN, COV, schedule)
    z, eps, t = gaussian_batch(50_000, seed=1)
    torch.manual_seed(0)
    random_model = build_model(MLP_CONFIG).double()

    optimum = float(cfm_loss(path.velocity, z, eps, t, schedule))
    with torch.no_grad():
        random = float(cfm_loss(random_model, z, eps, t, schedule))
    zero = float(cfm_loss(lambda x, s: torch.zeros_like(x), z, eps, t, schedule))
    assert optimum < random
    assert optimum < zero


def test_training_moves_loss_toward_optimum():
    schedule = get_schedule("linear")
    path = GaussianPath(MEAN, COV, schedule)
    z_eval, eps_eval, t_eval = (v.float() for v in gaussian_batch(20_000, seed=2))
    data, _, _ = gaussian_batch(4096, seed=3)
    torch.manual_seed(0)
    model = build_model(MLP_CONFIG)
    trainer = Trainer(model, schedule, settings(steps=200, batch_size=128, ema_decay=0.0), seed=0)
    order = BatchOrder(len(data), 128, seed=0)

    optimum = float(cfm_loss(path.velocity, z_eval, eps_eval, t_eval, schedule))
    with torch.no_grad():
        before = float(cfm_loss(model, z_eval, eps_eval, t_eval, schedule))
    for step in range(200):
        trainer.step(data[order.indices(step)].float())
    with torch.no_grad():
        after = float(cfm_loss(model, z_eval, eps_eval, t_eval, schedule))

    assert after < before
    assert after - optimum < 0.25 * (before - optimum)


def test_uniform_time_in_range():
    t = sample_time(10_000, "uniform", t_max=0.9, generator=torch.Generator().manual_seed(0))

    assert t.shape == (10_000,)
    assert float(t.min()) >= 0.0
    assert float(t.max()) <= 0.9
    assert float(t.mean()) == pytest.approx(0.45, abs=0.01)


def test_logit_normal_moments():
    t = sample_time(200_000, "logit_normal", loc=0.5, scale=0.8, generator=torch.Generator().manual_seed(0))
    logits = torch.log(t / (1 - t))

    assert float(logits.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(logits.std()) == pytest.approx(0.8, abs=0.01)


def test_logit_normal_symmetric_mean():
    t = sample_time(200_000, "logit_normal", loc=0.0, scale=1.0, generator=torch.Generator().manual_seed(1))

    assert float(t.mean()) == pytest.approx(0.5, abs=0.005)


def test_logit_normal_scaled_to_t_max():
    t = sample_time(10_000, "logit_normal", t_max=0.5, generator=torch.Generator().manual_seed(2))

    assert float(t.max()) < 0.5


def test_unknown_time_sampling_raises():
    with pytest.raises(ValueError, match="unknown time sampling 'beta'"):
        sample_time(3, "beta")


@pytest.mark.parametrize(("name", "expected"), [("linear", 1.0), ("cosine", 1.0), ("linear_vp", 1 - SINGULAR_TIME_MARGIN), ("vp", 1 - SINGULAR_TIME_MARGIN)])
def test_max_training_time(name, expected):
    assert max_training_time(get_schedule(name)) == expected


@pytest.mark.parametrize("name", ["linear_vp", "vp"])
def test_singular_target_finite_at_max_time(name):
    schedule = get_schedule(name)
    values = schedule(torch.tensor(max_training_time(schedule)))

    assert math.isfinite(float(values.d_beta))
    assert abs(float(values.d_beta)) < 25.0


def test_warmup_cosine_factor():
    assert warmup_cosine_factor(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine_factor(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine_factor(110, 10, 110) == pytest.approx(0.0, abs=1e-12)


def test_ema_closed_form():
    # With the parameter held at p, each update multiplies the gap e - p by its decay.
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.95)
    with torch.no_grad():
        model.weight.fill_(1.0)

    gap = 1.0
    for k in range(1, 41):
        gap *= min(0.95, (1 + k) / (10 + k))
        ema.update(model)
    assert float(ema.shadow["weight"]) == pytest.approx(1.0 - gap, rel=1e-6)


def test_ema_single_update():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema = EMA(model, decay=0.1)
    with torch.no_grad():
        model.weight.fill_(4.0)

    ema.update(model)
    # The first decay is min(0.1, 2 / 11) = 0.1: 0.1 * 2 + 0.9 * 4.
    assert float(ema.shadow["weight"]) == pytest.approx(3.8)


def test_ema_state_round_trip():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.99)
    ema.update(model)
    copy = EMA(torch.nn.Linear(2, 2), decay=0.5)

    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 1
    assert copy.decay == 0.99
    assert torch.equal(copy.shadow["weight"], ema.shadow["weight"])


def test_adamw_is_fused_on_cpu():
    optimizer = make_adamw(torch.nn.Linear(3, 2), lr=1e-3, weight_decay=0.0)

    assert optimizer.param_groups[0]["fused"] is True


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_first_step_closed_form(weight_decay):
    # After one step the bias-corrected moments are g and g^2, so AdamW moves each
    # parameter by -lr (g / (|g| + eps) + weight_decay p), up to rounding.
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    before = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in model.parameters()]
    lr, eps = 1e-2, 1e-8
    optimizer = make_adamw(model, lr=lr, weight_decay=weight_decay)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()

    optimizer.step()

    for p, p0, g in zip(model.parameters(), before, grads):
        expected = p0 * (1 - lr * weight_decay) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_batch_order_covers_each_epoch():
    order = BatchOrder(n_data=12, batch_size=4, seed=3)

    first_epoch = np.concatenate([order.indices(step) for step in range(3)])
    second_epoch = np.concatenate([order.indices(step) for step in range(3, 6)])
    assert sorted(first_epoch) == list(range(12))
    assert sorted(second_epoch) == list(range(12))
    assert not np.array_equal(first_epoch, second_epoch)


def test_batch_order_spans_epoch_boundary():
    order = BatchOrder(n_data=10, batch_size=4, seed=0)

    stream = np.concatenate([order.indices(step) for step in range(5)])
    assert sorted(stream) == sorted(list(range(10)) * 2)


def test_batch_order_depends_only_on_seed_and_step():
    first = BatchOrder(100, 8, seed=5)
    second = BatchOrder(100, 8, seed=5)

    assert np.array_equal(first.indices(37), second.indices(37))


def test_shard_splits_batch():
    batch = np.arange(8)

    assert np.array_equal(np.concatenate([shard(batch, rank, 4) for rank in range(4)]), batch)


def test_shard_uneven_raises():
    with pytest.raises(ValueError, match="cannot be split"):
        shard(np.arange(6), 0, 4)


def test_step_generator_streams():
    draw = lambda seed, rank, step: torch.randn(4, generator=step_generator(seed, rank, step))  # noqa: E731

    assert torch.equal(draw(0, 0, 5), draw(0, 0, 5))
    assert not torch.equal(draw(0, 0, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 0, 5), draw(0, 0, 6))


def test_non_finite_loss_stops_before_update():
    torch.manual_seed(0)
    model = build_model(MLP_CONFIG)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = Trainer(model, get_schedule("cosine"), settings(), seed=0)
    z = torch.full((8, 2), float("inf"))

    with pytest.raises(NonFiniteLossError) as caught:
        trainer.step(z)
    assert caught.value.step == 0
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("coupling", ["independent", "minibatch_ot"])
def test_trainer_resume_is_exact(coupling):
    data, _, _ = gaussian_batch(256, seed=4)
    data = data.float()
    order = BatchOrder(len(data), 32, seed=0)
    schedule = get_schedule("cosine")
    options = settings(steps=20, batch_size=32, coupling=coupling, time_sampling="logit_normal")

    def make_trainer():
        torch.manual_seed(0)
        return Trainer(build_model(MLP_CONFIG), schedule, options, seed=7)

    straight = make_trainer()
    for step in range(20):
        straight.step(data[order.indices(step)])

    interrupted = make_trainer()
    for step in range(9):
        interrupted.step(data[order.indices(step)])
    state = interrupted.state_dict()
    resumed = make_trainer()
    resumed.load_state_dict(state)
    for step in range(9, 20):
        resumed.step(data[order.indices(step)])

    assert resumed.step_count == 20
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for name, value in straight.ema.shadow.items():
        assert torch.equal(value, resumed.ema.shadow[name]), name


def test_model_file_round_trip(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(build_model(MLP_CONFIG), get_schedule("polynomial", n=3.0), settings(), seed=0)
    trainer.step(torch.randn(16, 2))
    path = tmp_path / "model.pt"
    torch.save(model_file_contents(trainer, MLP_CONFIG, schedule_config("polynomial", n=3.0), "moons"), path)

    loaded = load_model_file(path)
    ema_model = build_model(MLP_CONFIG)
    ema_model.load_state_dict(trainer.ema.shadow)
    x, t = torch.randn(5, 2), torch.rand(5)
    assert torch.equal(loaded.model(x, t), ema_model(x, t))
    assert loaded.schedule.name == "polynomial"
    assert loaded.schedule.n == 3.0
    assert loaded.dataset == "moons"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert isinstance(load_velocity_model(path), torch.nn.Module)


def test_model_file_wrong_format_raises(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, path)

    with pytest.raises(ValueError, match="not a flow matching model file"):
        load_model_file(path)


def test_model_velocity_expands_time():
    torch.manual_seed(0)
    model = build_model(MLP_CONFIG)
    velocity = model_velocity(model)
    x = torch.randn(4, 2, dtype=torch.float64)

    out = velocity(x, torch.tensor(0.3))
    assert out.dtype == torch.float64
    assert torch.allclose(out.float(), model(x.float(), torch.full((4,), 0.3)))
