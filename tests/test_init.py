"""Initial values (issue 11 item 6, DESIGN.md invariant 3): by default a factory's own initialisation.

``init="full"`` builds the factory's model once in host memory under ``torch.manual_seed(seed)`` and
slices it, so torchvision's and Hugging Face's own init (``zero_init_residual``, GPT-2's scaled
projections) are kept exactly; ``init="per-module"`` stays the path for models too large for host memory.
"""

from __future__ import annotations


import pytest
import torch
from conftest import FACTORIES
from distributed import run_ranks, values
from torch import nn

import subnetdp as sd


def torchvision_resnet() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10, zero_init_residual=True)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=65, n_positions=32))


MODELS = {"torchvision_resnet18": (torchvision_resnet, "torchvision"), "hf_gpt2": (gpt2, "transformers"),
          "zoo_resnet": (FACTORIES["resnet"], "torch")}


def factory(name: str):
    f, package = MODELS[name]
    pytest.importorskip(package)
    return f


def own_init(f, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return f().state_dict()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def slice_of(full: dict[str, torch.Tensor], plan: sd.Plan, worker: int, sub: dict[str, torch.Tensor]) -> dict:
    tmap = plan.tensor_map(worker)
    out = {}
    for n in sub:
        where = tmap[n]
        out[n] = full[n] if where is None else full[n].index_select(where[0], torch.tensor(where[1]))
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_init_is_the_factorys_own_exactly(name):
    f = factory(name)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    ours = sd.materialize(f, seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG is left as it was
    assert_same(ours.state_dict(), own_init(f, 5))
    if name == "torchvision_resnet18":  # zero_init_residual kept; per-module init would drop it
        assert torch.count_nonzero(ours.layer1[0].bn2.weight) == 0
        per_module = sd.materialize(f, seed=5, init="per-module")
        assert torch.count_nonzero(per_module.layer1[0].bn2.weight) > 0


@pytest.mark.parametrize("init", ["full", "per-module"])
@pytest.mark.parametrize("name,level", [("torchvision_resnet18", "block"), ("hf_gpt2", "neuron"),
                                        ("zoo_resnet", "neuron")])
def test_a_worker_is_the_slice_of_the_full_model_from_the_same_seed(name, level, init):
    """Invariant 3, for both init modes, through build_subnetwork and Simulation."""
    f = factory(name)
    p = sd.plan(f, 2, 0.5, level)
    full = sd.materialize(f, seed=9, init=init).state_dict()
    sim = sd.Simulation(f, p, lambda ps: torch.optim.SGD(ps, lr=0.1), seed=9, init=init)
    for k in range(2):
        sub = sd.build_subnetwork(f, p, k, seed=9, init=init).state_dict()
        assert_same(sub, slice_of(full, p, k, sub))
        assert_same(sim.workers[k].state_dict(), sub)


def test_unknown_init_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"init='kaiming': choose 'full'.*or 'per-module'"):
        sd.materialize(FACTORIES["resnet"], init="kaiming")


def distributed_init(rank: int, world: int, name: str) -> dict[str, torch.Tensor]:
    f = factory(name)
    torch.manual_seed(100 + rank)  # the ranks' own RNG states differ; the values must not
    sdp = sd.SubnetDataParallel(f, sd.plan(f, world, 1.0, "block"), seed=4)
    return {k: v.clone() for k, v in sdp.module.state_dict().items()}


@pytest.mark.parametrize("name", ["torchvision_resnet18", "hf_gpt2"])
def test_every_rank_gets_the_factorys_own_values(name):
    a, b = values(run_ranks(distributed_init, 2, name, timeout=90))
    expected = own_init(factory(name), 4)
    assert_same(a, b)
    assert_same(a, {n: expected[n] for n in a})


def test_train_flag_reaches_the_backends():
    from subnetdp.config import ConfigError, TrainConfig, validate

    with pytest.raises(ConfigError, match="--init 'layerwise' is not allowed; choose one of: full, per-module"):
        validate(TrainConfig(init="layerwise", simulate=2))
    assert TrainConfig().init == "full"
