"""Swin-T (timm's, from configuration) in the zoo: units found at both levels with no user code."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import ce_loss, image_batches
from distributed import run_ranks, values

import subnetdp as sd

pytest.importorskip("timm")

from subnetdp.models import swin_t_cifar  # noqa: E402

# two stages (the second starts with patch merging), 3 and 6 heads, windows 4 with shifts in stage one
TINY = functools.partial(swin_t_cifar, width=12, depths=(2, 2), num_heads=(3, 6))


def test_units_are_found_at_both_levels():
    p = sd.plan(TINY, 4, 0.5, "block")
    assert [u.name for u in p.units] == ["layers.0.blocks.0", "layers.0.blocks.1",
                                         "layers.1.blocks.0", "layers.1.blocks.1"]
    assert "layers.1.downsample.reduction.weight" in p.always_kept  # patch merging on every worker
    n = sd.plan(TINY, 4, 0.5, "neuron")
    groups = {g.name: g for g in n.groups}
    heads = groups["layers.1.blocks.0.attn:heads"]
    assert heads.size == 6
    sliced = {s.tensor: s.dim for s in heads.slices}
    assert sliced["layers.1.blocks.0.attn.relative_position_bias_table"] == 1
    assert groups["layers.0.blocks.1.mlp:width"].size == 48


def test_seeded_init_equals_timm_buffers_and_is_deterministic():
    a, b = sd.materialize(TINY, seed=3), sd.materialize(TINY, seed=3)
    plain = TINY()
    for name, t in plain.named_buffers():  # relative position indices and shifted-window masks
        torch.testing.assert_close(dict(a.named_buffers())[name], t, rtol=0, atol=0)
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(t, u, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("level", ["block", "neuron"])
def test_a_subnetwork_holding_everything_equals_the_full_model(level):
    x = image_batches(1, n=2, seed=4)[0][0]
    full = sd.materialize(TINY, seed=5).eval()
    sub = sd.build_subnetwork(TINY, sd.plan(TINY, 2, 1.0, level), 1, seed=5).eval()
    torch.testing.assert_close(sub(x), full(x), rtol=0, atol=0)


def test_sliced_heads_keep_their_bias_columns_and_their_attention():
    """A worker's attention equals the full attention restricted to its heads (no inverted scaling)."""
    p = sd.plan(TINY, 4, 0.5, "neuron")
    full = sd.materialize(TINY, seed=6).eval()
    sub = sd.build_subnetwork(TINY, p, 2, seed=6, neuron_scaling="none").eval()
    name = "layers.1.blocks.1.attn"
    dim, idx = p.tensor_map(2)[f"{name}.relative_position_bias_table"]
    heads = sorted({i for i in idx})
    assert sub.get_submodule(name).num_heads == len(heads) < 6
    torch.testing.assert_close(sub.get_parameter(f"{name}.relative_position_bias_table"),
                               full.get_parameter(f"{name}.relative_position_bias_table")[:, heads])
    x = torch.randn(8, 16, 24)  # 8 windows of 4x4 tokens, stage-two width
    f_attn, s_attn = full.get_submodule(name), sub.get_submodule(name)
    with torch.no_grad():  # zero the other heads' output columns of proj: the full model then adds only ours
        keep = torch.zeros(6, 4)
        keep[heads] = 1
        proj = f_attn.proj.weight.clone()
        f_attn.proj.weight.mul_(keep.reshape(1, -1))
        expected = f_attn(x)
        f_attn.proj.weight.copy_(proj)
    torch.testing.assert_close(s_attn(x), expected, rtol=1e-5, atol=1e-6)


def swin_steps(rank: int, world: int) -> dict:
    out = {}
    for level in ("block", "neuron"):
        sdp = sd.SubnetDataParallel(TINY, sd.plan(TINY, world, 0.5, level), seed=1)
        opt = torch.optim.AdamW(sdp.parameters(), lr=1e-3)
        for step in range(3):
            opt.zero_grad()
            ce_loss(sdp, image_batches(world, n=4, seed=step)[rank]).backward()
            opt.step()
        out[level] = sdp.full_state_dict()
    return out


def test_trained_on_two_ranks_then_assembled_into_a_plain_model_that_loads_strictly():
    ranks = values(run_ranks(swin_steps, 2))
    init = sd.materialize(TINY, seed=1).state_dict()
    for level in ("block", "neuron"):
        state = ranks[0][level]
        model = TINY()
        model.load_state_dict(state, strict=True)
        assert any(not torch.equal(state[n], init[n]) for n in state)  # it trained
        assert torch.isfinite(model(image_batches(1, n=2)[0][0])).all()


def test_a_missing_timm_names_the_extra(monkeypatch):
    import builtins

    from subnetdp.models import swin

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name.startswith("timm"):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    swin._swin_class.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"subnetdp\[hf\]"):
            swin_t_cifar()
    finally:
        monkeypatch.undo()
        swin._swin_class.cache_clear()
