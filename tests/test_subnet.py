"""Physical subnetworks: absent units do not exist, values equal the full model's slice (invariant 3)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import FACTORIES, image_batches, llama_tiny, resnet50
from torch import nn

import subnetdp as sd
from subnetdp.models import resnet18


def slice_of(full: dict[str, torch.Tensor], name: str, where) -> torch.Tensor:
    return full[name] if where is None else full[name].index_select(where[0], torch.tensor(where[1], dtype=torch.long))


def assert_is_slice_of_full(sub: nn.Module, full: nn.Module, p: sd.Plan, worker: int) -> None:
    fsd, tmap = full.state_dict(), p.tensor_map(worker)
    sub_sd = sub.state_dict()
    assert set(sub_sd) <= set(fsd)
    for name, t in sub_sd.items():
        assert torch.equal(t, slice_of(fsd, name, tmap[name])), name


CASES = [(name, level) for name in sorted(FACTORIES) for level in ("block", "neuron")] + [
    ("llama", "block"), ("llama", "neuron"), ("resnet50", "neuron")]
MORE = {"llama": functools.partial(llama_tiny, tie_embeddings=True), "resnet50": functools.partial(resnet50, width=4)}


@pytest.mark.parametrize("name,level", CASES)
def test_subnetwork_equals_slice_of_full_model_at_init(name, level):
    f = FACTORIES.get(name) or MORE[name]
    p = sd.plan(f, 4, 0.5, level)
    full = sd.materialize(f, seed=5)
    for k in range(4):
        assert_is_slice_of_full(sd.build_subnetwork(f, p, k, seed=5), full, p, k)
    other = sd.build_subnetwork(f, p, 0, seed=6)
    assert any(not torch.equal(a, b) for a, b in zip(other.parameters(), sd.build_subnetwork(f, p, 0, seed=5).parameters()))


def test_a_real_model_is_sliced_as_it_is():
    f = FACTORIES["resnet"]
    model = f()  # ordinary init, not subnetdp's
    p = sd.plan(model, 2, 0.5, "neuron")
    sub = sd.build_subnetwork(model, p, 1)
    assert_is_slice_of_full(sub, model, p, 1)
    assert next(model.parameters()).device.type == "cpu"  # the user's model is untouched


def test_absent_blocks_do_not_exist_and_sliced_layers_are_narrow():
    f = functools.partial(resnet18, width=8)
    block = sd.plan(f, 4, 0.5, "block")
    sub = sd.build_subnetwork(f, block, 0)
    dropped = [b.name for b in block.dropped_blocks(0)]
    assert dropped and all(isinstance(sub.get_submodule(n), nn.Identity) for n in dropped)
    assert not any(k.startswith(dropped[0] + ".") for k in sub.state_dict())
    neuron = sd.plan(f, 4, 0.5, "neuron")
    sub = sd.build_subnetwork(f, neuron, 0)
    assert sub.layer1[0].conv1.weight.shape == (4, 8, 3, 3) and sub.layer1[0].conv1.out_channels == 4
    assert sub.layer1[0].conv2.weight.shape == (8, 4, 3, 3) and sub.layer1[0].bn1.running_mean.shape == (4,)
    assert sub(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_transition_reduced_to_its_shortcut_runs():
    f = functools.partial(resnet18, width=8)
    p = sd.plan(f, 4, 0.5, "block", transitions="shortcut")
    for k in range(4):
        sub = sd.build_subnetwork(f, p, k)
        assert sum(t.numel() for t in sub.parameters()) == p.param_count(k)
        assert sub(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_tied_embeddings_stay_tied():
    f = functools.partial(llama_tiny, tie_embeddings=True)
    sub = sd.build_subnetwork(f, sd.plan(f, 2, 0.5, "neuron"), 0)
    assert sub.output.weight is sub.tok_embeddings.weight


@pytest.mark.parametrize("name", ["vit", "llama"])
def test_subnetwork_holding_every_head_equals_the_full_model(name):
    f = FACTORIES.get(name) or MORE[name]
    p = sd.plan(f, 2, 1.0, "neuron")
    full = sd.materialize(f, seed=1).eval()
    sub = sd.build_subnetwork(f, p, 0, seed=1).eval()
    x = torch.randint(0, 65, (2, 12)) if name == "llama" else torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(sub(x), full(x), rtol=0, atol=0)


def test_gqa_heads_are_sliced_with_their_query_heads():
    f = llama_tiny  # 4 query heads, 2 kv heads, head_dim 16
    p = sd.plan(f, 2, 0.5, "neuron")
    sub = sd.build_subnetwork(f, p, 0, neuron_scaling="none")
    attn = sub.layers[0].attention
    assert (attn.n_heads, attn.n_kv_heads) == (2, 1)
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    # equals the full layer with the other kv group's query heads zeroed in o_proj
    full = sd.materialize(f).layers[0].attention
    kept = p.tensor_map(0)["layers.0.attention.o_proj.weight"][1]
    with torch.no_grad():
        mask = torch.zeros(64)
        mask[kept] = 1
        full.o_proj.weight.mul_(mask)
    x = torch.randn(2, 8, 64)
    torch.testing.assert_close(attn(x), full(x), rtol=1e-5, atol=1e-6)


def test_inverted_scaling_multiplies_consumer_input():
    f = FACTORIES["resnet"]
    p = sd.plan(f, 4, 0.5, "neuron")
    plain = sd.build_subnetwork(f, p, 0, neuron_scaling="none")
    scaled = sd.build_subnetwork(f, p, 0, neuron_scaling="inverted")
    x = torch.randn(1, 4, 32, 32)
    conv = "layer1.0.conv2"
    factor = p.consumer_scales(0)[conv]
    assert factor == 2.0
    torch.testing.assert_close(scaled.get_submodule(conv)(x[:, :2]), plain.get_submodule(conv)(x[:, :2] * 2))
    with pytest.raises(ValueError, match="neuron_scaling='double'"):
        sd.build_subnetwork(f, p, 0, neuron_scaling="double")


def test_subnetwork_trains():
    f = FACTORIES["resnet"]
    sub = sd.build_subnetwork(f, sd.plan(f, 4, 0.5, "block"), 0)
    x, y = image_batches(1, n=8)[0]
    opt = torch.optim.SGD(sub.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(sub(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7
