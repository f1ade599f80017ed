"""SDPOptions (one validated object for both engines and builders) and the masking regimes' layouts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import FACTORIES, ResidualMLP

import subnetdp as sd
from subnetdp.masking import REGIMES, regime
from subnetdp.options import MASKINGS, SDPOptions, sdp_options


@pytest.mark.parametrize("field,value,message", [
    ("sync", "sometimes", "sync='sometimes': choose one of"),
    ("sync_every", 0, "sync_every=0: need a positive whole number"),
    ("sync_every", True, "sync_every=True"),
    ("neuron_scaling", "half", "neuron_scaling='half': choose one of"),
    ("checkpointing", "layers", "checkpointing='layers': choose one of"),
    ("masking", "sideways", "masking='sideways': choose one of"),
    ("init", "lazy", "init='lazy'"),
    ("bucket_elements", 0, "bucket_elements=0: need a positive whole number"),
    ("check_every", -1, "check_every=-1: need a whole number of steps, 0 (never) or more"),
    ("seed", 1.5, "seed=1.5: need a whole number"),
    ("sharding", "rows", "sharding='rows': choose one of"),
])
def test_every_bad_option_fails_when_the_object_is_made(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SDPOptions(**{field: value})


def test_backward_masking_refuses_parameter_averaging():
    with pytest.raises(ValueError, match="masking='backward' with sync='params'"):
        SDPOptions(masking="backward", sync="params")


def test_options_are_frozen_normalised_and_keywords_override_them():
    o = SDPOptions(checkpointing=None, seed=3)
    assert o.checkpointing == "none"
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.seed = 4  # type: ignore[misc]
    assert sdp_options(o, sync="params", sync_every=2) == SDPOptions(seed=3, sync="params", sync_every=2)
    assert sdp_options() == SDPOptions()
    with pytest.raises(TypeError, match="unexpected keyword argument.*'sync_evry'.*the SDP options are seed, sync"):
        sdp_options(sync_evry=2)
    with pytest.raises(TypeError, match="pass a subnetdp.SDPOptions"):
        sdp_options({"seed": 1})  # type: ignore[arg-type]


def test_the_digest_changes_with_every_field():
    base = SDPOptions()
    changed = dict(seed=1, sync="params", sync_every=2, neuron_scaling="none", checkpointing="blocks",
                   masking="backward", init="per-module", bucket_elements=7, check_every=0, sharding="holders",
                   param_dtype="bfloat16")
    assert set(changed) == {f.name for f in dataclasses.fields(SDPOptions)}
    digests = {base.digest()}
    for name, value in changed.items():
        if name == "masking":
            other = SDPOptions(masking=value)
        elif name == "param_dtype":  # FSDP2's mixed precision: only with sharding over holders
            other = SDPOptions(sharding="holders", param_dtype=value)
        else:
            other = dataclasses.replace(base, **{name: value})
        digests.add(other.digest())
    assert len(digests) == len(changed) + 1  # param_dtype's differs from sharding="holders"'s alone too
    assert SDPOptions(seed=1).digest() == SDPOptions(seed=1).digest()


def test_an_options_object_and_its_keywords_build_the_same_workers():
    p = sd.plan(FACTORIES["resnet"], 2, 0.5, "neuron", seed=1)
    a = sd.build_subnetwork(FACTORIES["resnet"], p, 1, SDPOptions(seed=5, neuron_scaling="none"))
    b = sd.build_subnetwork(FACTORIES["resnet"], p, 1, seed=5, neuron_scaling="none")
    for (n, x), (m, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n == m and torch.equal(x, y)
    opt = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    sim = sd.Simulation(ResidualMLP, sd.plan(ResidualMLP, 2, 0.5, "block"), opt, SDPOptions(masking="backward"))
    assert sim.options.masking == "backward" and sim.regime is REGIMES["backward"]


def test_regimes_are_named_by_the_masking_choices():
    assert tuple(REGIMES) == MASKINGS
    with pytest.raises(ValueError, match="masking='sideways': choose one of"):
        regime("sideways")


@pytest.mark.parametrize("level", ["block", "neuron"])
def test_layouts_say_what_each_worker_holds_and_sends(level):
    """Forward masking: a worker's own tensors, averaged with their holders, nothing sent after a step.
    Backward masking: every tensor whole on every worker, the same holder sets averaged, and the
    values a worker does not train sent after each step; every value is everyone's."""
    p = sd.plan(ResidualMLP, 4, 0.5, level)
    for k in range(4):
        fwd = regime("forward").worker(ResidualMLP, p, k, SDPOptions(), "cpu")
        bwd = regime("backward").worker(ResidualMLP, p, k, SDPOptions(masking="backward"), "cpu")
        assert fwd.tensor_map == p.tensor_map(k) and fwd.broadcast == {}
        assert all(where is None for where in bwd.tensor_map.values()) and set(bwd.tensor_map) >= set(p.tensor_map(k))
        assert [b.holders for b in fwd.reduce] == [b.holders for b in bwd.reduce]
        assert [b.numel for b in fwd.reduce] == [b.numel for b in bwd.reduce]
        sets = {h for n, _ in p.tensors if n in dict(bwd.module.named_parameters()) for h in p.element_holders(n)[1]}
        assert set(bwd.broadcast) == {h for h in sets if len(h) < 4} != set()
        assert sum(b.numel for b in bwd.broadcast.values()) == sum(
            t.numel() for n, t in bwd.module.named_parameters() if n in dict(p.tensors)) - sum(
            b.numel for b in bwd.reduce if len(b.holders) == 4)
        name = p.tensors[0][0]
        assert bwd.value_holders(name) == (None, [(0, 1, 2, 3)])
        assert fwd.value_holders(name) == p.element_holders(name)
