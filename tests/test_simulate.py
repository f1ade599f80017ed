"""The in-process simulation: holder averaging (invariant 7), holders agree (6), assembly (8)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FACTORIES, ResidualMLP, ce_loss, image_batches
from torch.nn import functional as F

import subnetdp as sd


def full_coordinates(sim: sd.Simulation, grads: bool = False) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Each worker's tensors scattered into full-model coordinates, with a mask of the held elements."""
    out = {}
    for k, w in enumerate(sim.workers):
        tmap = sim.plan.tensor_map(k)
        for name, t in w.named_parameters():
            value = t.grad if grads else t.detach()
            full = torch.full(sim.plan.shapes[name], float("nan"))
            where = tmap[name]
            if where is None:
                full.copy_(value)
            else:
                full.index_copy_(where[0], torch.tensor(where[1], dtype=torch.long), value)
            out.setdefault(name, []).append((k, full))
    return out


def world_reduction(per_worker: dict[str, list[tuple[int, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The test oracle: a zero-filled full buffer plus a holder count, per tensor."""
    out = {}
    for name, items in per_worker.items():
        total = torch.zeros_like(items[0][1])
        count = torch.zeros_like(items[0][1])
        for _, full in items:
            held = ~torch.isnan(full)
            total += torch.where(held, full, 0.0)
            count += held
        out[name] = total / count
    return out


def test_hand_written_average_over_holders():
    """K=2, C=0.5, block level: worker 0 holds one block, worker 1 the other; the head is shared."""
    p = sd.plan(ResidualMLP, 2, 0.5, "block")
    sim = sd.Simulation(ResidualMLP, p, lambda ps: torch.optim.SGD(ps, lr=0.0), seed=3)
    x = torch.randn(2, 5, 4)
    y = torch.randint(0, 3, (2, 5))
    local = []
    for k in range(2):  # reference: separate subnetworks, gradients by plain autograd
        m = copy.deepcopy(sim.workers[k])
        F.cross_entropy(m(x[k]), y[k]).backward()
        local.append({n: t.grad.clone() for n, t in m.named_parameters()})
    sim.step([(x[k], y[k]) for k in range(2)], lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    own = {u.name: p.holders(u)[0] for u in p.units}
    for k in range(2):
        for name, t in sim.workers[k].named_parameters():
            if name.startswith("head."):
                expected = (local[0][name] + local[1][name]) / 2  # held by both: average over 2
            else:
                assert own[name.rsplit(".", 2)[0]] == k
                expected = local[k][name]  # held by one worker: its own gradient, not divided by K
            torch.testing.assert_close(t.grad, expected, rtol=0, atol=0)


def assert_sync_matches_world_reduction(sim: sd.Simulation, batches: list, loss_fn) -> None:
    """Each worker's backward, then sync; every held gradient element must equal the oracle's average."""
    for m, b in zip(sim.workers, batches):
        loss_fn(m, b).backward()
    expected = world_reduction(full_coordinates(sim, grads=True))
    sim.sync_gradients()
    for name, items in full_coordinates(sim, grads=True).items():
        for _, full in items:
            held = ~torch.isnan(full)
            torch.testing.assert_close(full[held], expected[name][held], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("level", ["block", "neuron"])
def test_sync_equals_world_reduction_oracle(factory, level):
    p = sd.plan(factory, 4, 0.5, level)
    sim = sd.Simulation(factory, p, lambda ps: torch.optim.SGD(ps, lr=0.0))
    assert_sync_matches_world_reduction(sim, image_batches(4), ce_loss)


@pytest.mark.parametrize("level", ["block", "neuron"])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_holders_agree_after_steps_and_assembly_loads(factory, level, opt):
    p = sd.plan(factory, 4, 0.5, level)
    make = (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4)) if opt == "sgd" else (
        lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    sim = sd.Simulation(factory, p, make, seed=1)
    before = sim.full_state_dict()
    for step in range(3):
        sim.step(image_batches(4, seed=step), ce_loss)
    for name, items in full_coordinates(sim).items():  # invariant 6
        ref = items[0][1]
        for _, full in items[1:]:
            both = ~torch.isnan(ref) & ~torch.isnan(full)
            torch.testing.assert_close(full[both], ref[both], rtol=0, atol=0)
    state = sim.full_state_dict()
    model = factory()
    model.load_state_dict(state)  # invariant 8: loads into the unmodified architecture
    assert any(not torch.equal(before[k], state[k]) for k in state)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    per_param = 2 if opt == "adamw" else 1  # invariant 2: optimizer state only for held parameters
    for k, o in enumerate(sim.optimizers):
        numel = sum(s.numel() for st in o.state.values() for key, s in st.items() if key != "step")
        assert numel == per_param * p.param_count(k)


def test_coverage_one_equals_plain_data_parallel_averaging():
    f = FACTORIES["vit"]
    p = sd.plan(f, 2, 1.0, "block")
    sim = sd.Simulation(f, p, lambda ps: torch.optim.SGD(ps, lr=0.1), seed=2)
    ref = sd.materialize(f, seed=2)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(2):
        batches = image_batches(2, seed=step)
        sim.step(batches, ce_loss)
        opt.zero_grad()
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        F.cross_entropy(ref(x), y).backward()  # the mean over both shards = DP's average
        opt.step()
    state = sim.full_state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6)


def test_batchnorm_statistics_are_averaged_over_holders():
    f = FACTORIES["resnet"]
    p = sd.plan(f, 4, 0.5, "neuron")
    sim = sd.Simulation(f, p, lambda ps: torch.optim.SGD(ps, lr=0.0))
    sim.step(image_batches(4), ce_loss)
    name = "bn1.running_mean"  # the stem's BN: held by all four workers
    means = [w.state_dict()[name] for w in sim.workers]
    assert not torch.equal(means[0], means[1])
    state = sim.full_state_dict()
    torch.testing.assert_close(state[name], torch.stack(means).mean(0))


def test_non_finite_loss_fails_fast():
    f = FACTORIES["resnet"]
    sim = sd.Simulation(f, sd.plan(f, 2, 0.5), lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(FloatingPointError, match="worker 0 got a non-finite loss"):
        sim.step(image_batches(2), lambda m, b: ce_loss(m, b) * float("nan"))
    with pytest.raises(ValueError, match="got 1 batches for 2 workers"):
        sim.step(image_batches(1), ce_loss)


def test_residual_scaling_and_batchnorm_recalibration():
    f = FACTORIES["resnet"]
    p = sd.plan(f, 4, 0.5, "block")
    model = sd.materialize(f).eval()
    x = torch.randn(4, 3, 32, 32)
    plain = model(x)
    scaled_model = copy.deepcopy(model)
    layers = sd.scale_residual_branches(scaled_model, p)
    assert layers == [f"{u.name}.bn2" for u in p.units]  # BasicBlock: the branch ends in bn2

    # folded into bn2's weight and bias, it is stochastic depth's test-time block relu(x + r/K * f(x))
    def depth_scaled(_m, args, _out, block):
        h = args[0]
        f_x = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h)))))
        return torch.relu(h + 0.5 * f_x)

    handles = [model.get_submodule(u.name).register_forward_hook(
        lambda m, a, o, b=model.get_submodule(u.name): depth_scaled(m, a, o, b)) for u in p.units]
    torch.testing.assert_close(scaled_model(x), model(x))
    for h in handles:
        h.remove()
    assert not torch.allclose(plain, scaled_model(x))
    untouched = copy.deepcopy(model)
    sd.scale_residual_branches(untouched, sd.plan(f, 4, 1.0, "block"))  # scale 1 changes nothing
    torch.testing.assert_close(untouched(x), plain)
    n = sd.recalibrate_batchnorm(model, [x])
    assert n == 1 and not model.training
    torch.testing.assert_close(model.bn1.running_mean, model.conv1(x).mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    mean = model.bn1.running_mean.clone()
    assert sd.recalibrate_batchnorm(model, [(x, torch.zeros(4, dtype=torch.long))]) == 1  # (x, y) batches too
    torch.testing.assert_close(model.bn1.running_mean, mean, rtol=0, atol=0)
    with pytest.raises(TypeError, match="an input tensor or an \\(inputs, targets\\) pair, got str"):
        sd.recalibrate_batchnorm(model, ["x"])
    with pytest.raises(ValueError, match="block-level"):
        sd.scale_residual_branches(model, sd.plan(f, 4, 0.5, "neuron"))


def test_residual_scaling_of_a_transformer_block_scales_both_branches():
    from subnetdp.models import llama_tiny

    f = lambda: llama_tiny(vocab_size=17, max_seq_len=8)  # noqa: E731
    p = sd.plan(f, 4, 0.5, "block")
    model = sd.materialize(f)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = sd.scale_residual_branches(model, p)
    assert len(layers) == 2 * len(p.units) and all(n.endswith(("o_proj", "down_proj")) for n in layers)
    for name in layers:
        torch.testing.assert_close(model.get_submodule(name).weight, 0.5 * before[name + ".weight"])


def test_simulated_training_lowers_the_loss():
    f = FACTORIES["resnet"]
    sim = sd.Simulation(f, sd.plan(f, 2, 0.5, "neuron"), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    batches = image_batches(2, n=8)
    first = sim.step(batches, ce_loss)
    for _ in range(12):
        # oracle: each worker's own loss on its batch, computed apart (on a copy) before the step
        with torch.no_grad():
            expected = [float(ce_loss(copy.deepcopy(w), b)) for w, b in zip(sim.workers, batches)]
        last = sim.step(batches, ce_loss)
        assert last == pytest.approx(expected, rel=1e-6)
    assert sum(last) < sum(first) * 0.7
    assert all(a < b for a, b in zip(last, first))  # every worker's loss fell, not only their sum


def test_clipping_uses_the_full_models_averaged_gradient_norm():
    f = FACTORIES["resnet"]
    sim = sd.Simulation(f, sd.plan(f, 4, 0.5, "neuron"), lambda ps: torch.optim.SGD(ps, lr=0.0))
    for m, b in zip(sim.workers, image_batches(4)):
        ce_loss(m, b).backward()
    sim.sync_gradients()
    averaged = world_reduction(full_coordinates(sim, grads=True))  # every element once
    expected = torch.sqrt(sum((torch.nan_to_num(t) ** 2).sum() for t in averaged.values()))
    before = [p.grad.clone() for p in sim.workers[0].parameters()]
    norm = sim.clip_grad_norm_(float(expected) / 2)
    assert norm == pytest.approx(float(expected), rel=1e-5)
    for g, p in zip(before, sim.workers[0].parameters()):  # scaled by max_norm / norm on every worker
        torch.testing.assert_close(p.grad, g * 0.5, rtol=1e-4, atol=1e-7)


def test_residual_scaling_of_a_shortcut_plan_keeps_the_shortcut_path_unscaled():
    """Transition block held by r of K: relu(shortcut(x) + (r/K) * f(x)), the scale folded into bn2."""
    f = FACTORIES["resnet"]
    p = sd.plan(f, 4, 0.5, "block", transitions="shortcut")
    transitions = [b.name for b in p.blocks if b.transition]
    assert transitions and all(any(u.name == t for u in p.units) for t in transitions)
    model = sd.materialize(f).eval()
    x = torch.randn(4, 3, 32, 32)
    plain = model(x)
    block = model.get_submodule(transitions[0])
    h = torch.randn(4, block.conv1.in_channels, 16, 16)
    with torch.no_grad():
        branch = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(h)))))
        expected = torch.relu(block.downsample(h) + 0.5 * branch)
    scaled = sd.scale_residual_branches(model, p)
    assert f"{transitions[0]}.bn2" in scaled and not any(".downsample" in s for s in scaled)
    with torch.no_grad():
        torch.testing.assert_close(block(h), expected)
        assert torch.isfinite(model(x)).all() and not torch.allclose(model(x), plain)
    fresh = sd.materialize(f).eval()
    sd.scale_residual_branches(fresh, sd.plan(f, 4, 1.0, "block", transitions="shortcut"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), plain)  # every block on every worker: r/K = 1 changes nothing
