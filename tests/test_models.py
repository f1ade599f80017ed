"""The model zoo: meta construction, seeded initialisation, forward shapes, narrowing, training."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from subnetdp.init import has_own_tensors, init_module_, materialize
from subnetdp.models import IMAGE, LANGUAGE, MODELS, ZOO, get_model, load_model_factory, model_factory, model_kind, zoo_model
from subnetdp.models.llama import Attention as LlamaAttention
from subnetdp.models.llama import FeedForward, Llama, LlamaConfig, llama_tiny
from subnetdp.models.resnet import resnet18, resnet50, wide_resnet18
from subnetdp.models.zoo import names as zoo_names
from subnetdp.models.vit import Attention as VitAttention
from subnetdp.models.vit import Mlp, vit_small_patch4

# Small versions of every architecture: (factory, example input, expected output shape).
SMALL: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], tuple[int, ...]]] = {
    "resnet18": (lambda: resnet18(num_classes=7, width=8), lambda: torch.randn(2, 3, 32, 32),
                 (2, 7)),
    "resnet18_grey": (lambda: resnet18(width=4, in_channels=1), lambda: torch.randn(2, 1, 28, 28),
                      (2, 10)),
    "resnet50": (lambda: resnet50(num_classes=5, width=4), lambda: torch.randn(2, 3, 32, 32),
                 (2, 5)),
    "vit": (lambda: vit_small_patch4(num_classes=3, dim=32, depth=2, num_heads=4),
            lambda: torch.randn(2, 3, 32, 32), (2, 3)),
    "llama": (lambda: llama_tiny(n_layers=2), lambda: torch.randint(0, 65, (2, 12)), (2, 12, 65)),
    "llama_tied": (lambda: llama_tiny(n_layers=2, tie_embeddings=True),
                   lambda: torch.randint(0, 65, (2, 12)), (2, 12, 65)),
}


def all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and every buffer, persistent or not."""
    out = dict(model.named_parameters())
    out.update(model.named_buffers())
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registered_models_build_on_meta(name: str) -> None:
    with torch.device("meta"):
        model = get_model(name)
    tensors = all_tensors(model)
    assert tensors and all(t.is_meta for t in tensors.values())
    assert callable(getattr(model, "init_weights", None))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_shape_on_cpu(name: str) -> None:
    factory, example, shape = SMALL[name]
    model = factory()
    assert not any(t.is_meta for t in all_tensors(model).values())
    out = model(example())
    assert out.shape == shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_materialize_is_seeded_and_complete(name: str) -> None:
    factory, example, shape = SMALL[name]
    a, b, c = (materialize(factory, seed=s) for s in (0, 0, 1))
    ta, tb, tc = all_tensors(a), all_tensors(b), all_tensors(c)
    assert ta.keys() == tb.keys() == tc.keys()
    for key, t in ta.items():
        assert t.device.type == "cpu", key
        if t.is_floating_point():
            assert torch.isfinite(t).all(), key
        assert torch.equal(t, tb[key]), f"{key} differs between two materializations, seed 0"
    # Every randomly initialised parameter depends on the seed (constants such as norm weights
    # and rotary tables do not).
    random_keys = [k for k, t in a.named_parameters() if t.numel() > 1 and t.std() > 0]
    assert random_keys and all(not torch.equal(ta[k], tc[k]) for k in random_keys)
    assert a(example()).shape == shape


@pytest.mark.parametrize("name", sorted(SMALL))
def test_init_weights_fills_every_own_tensor(name: str) -> None:
    """Poison each module's fresh tensors, then initialise it: nothing may stay poisoned."""
    factory = SMALL[name][0]
    with torch.device("meta"):
        model = factory()
    for mod_name, module in model.named_modules():
        if not has_own_tensors(module):
            continue
        module.to_empty(device="cpu", recurse=False)
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            t.data.fill_(float("nan") if t.is_floating_point() else 12345)
        init_module_(model, module, mod_name, seed=0)
    for key, t in all_tensors(model).items():
        assert not t.is_meta, key
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{key} was not initialised"
        else:
            assert not (t == 12345).any(), f"{key} was not initialised"


def test_tied_embeddings_stay_tied_after_materialize() -> None:
    model = materialize(lambda: llama_tiny(tie_embeddings=True), seed=3)
    assert model.output.weight is model.tok_embeddings.weight
    assert len(list(model.parameters())) == len(list(llama_tiny().parameters())) - 1


def test_resnet_init_and_names_match_torchvision() -> None:
    import torchvision

    model = materialize(lambda: resnet18(width=16), seed=0)
    w = model.layer3[0].conv1.weight  # fan_out = 64 * 9
    assert abs(w.std().item() - math.sqrt(2 / (64 * 9))) < 0.1 * math.sqrt(2 / (64 * 9))
    assert torch.equal(model.layer2[1].bn2.weight, torch.ones(32))
    assert torch.equal(model.layer2[1].bn2.bias, torch.zeros(32))
    assert isinstance(model.layer2[0].downsample, nn.Sequential) and model.layer1[0].downsample is None
    for ours, theirs in ((resnet18(width=8), torchvision.models.resnet18),
                         (resnet50(width=4), torchvision.models.resnet50)):
        with torch.device("meta"):
            ref = theirs(num_classes=10)
        assert ours.state_dict().keys() == ref.state_dict().keys()
    with torch.device("meta"):
        wide = wide_resnet18(width_factor=2)
    assert wide.conv1.out_channels == 128 and wide.fc.in_features == 1024


def test_transformer_init_statistics() -> None:
    model = materialize(lambda: llama_tiny(dim=128, n_heads=4, n_kv_heads=2, n_layers=8), seed=0)
    std_out = 0.02 / math.sqrt(2 * 8)
    assert abs(model.layers[3].attention.o_proj.weight.std().item() - std_out) < 0.1 * std_out
    assert abs(model.layers[3].feed_forward.down_proj.weight.std().item() - std_out) < 0.1 * std_out
    assert abs(model.layers[3].attention.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.layers[0].ffn_norm.weight, torch.ones(128))
    vit = materialize(lambda: vit_small_patch4(dim=64, depth=2, num_heads=4), seed=0)
    assert abs(vit.pos_embed.std().item() - 0.02) < 0.003
    assert torch.equal(vit.blocks[1].attn.qkv.bias, torch.zeros(192))
    assert abs(vit.blocks[1].mlp.fc1.weight.std().item() - 0.02) < 0.002


def test_llama_config_defaults_and_validation() -> None:
    assert LlamaConfig(vocab_size=10, dim=768, n_layers=1, n_heads=12).mlp_hidden == 2048
    assert LlamaConfig(vocab_size=10, dim=64, n_layers=1, n_heads=4).mlp_hidden == 192
    cfg = LlamaConfig(vocab_size=10, dim=64, n_layers=1, n_heads=4)
    assert cfg.n_kv_heads == 4 and cfg.head_dim == 16
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(vocab_size=10, dim=64, n_layers=1, n_heads=4, n_kv_heads=3)
    assert llama_tiny(dim=128).layers[0].feed_forward.up_proj.out_features == 352
    with pytest.raises(TypeError, match="unknown LlamaConfig"):
        llama_tiny(width=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        llama_tiny(max_seq_len=8)(torch.zeros(1, 9, dtype=torch.long))


def test_llama_is_causal() -> None:
    model = Llama(LlamaConfig(vocab_size=20, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)).eval()
    idx = torch.randint(0, 20, (1, 10))
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 20
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-4)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _zero_other_columns(layer: nn.Linear, keep: torch.Tensor) -> None:
    mask = torch.zeros(layer.in_features, dtype=torch.bool)
    mask[keep] = True
    with torch.no_grad():
        layer.weight[:, ~mask] = 0


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


@pytest.mark.parametrize("kv_heads_kept, q_heads_kept", [([0], [0, 1]), ([1], [2, 3]),
                                                          ([0, 1], [0, 2])])
def test_llama_attention_narrowed_equals_masked_full(kv_heads_kept: list[int],
                                                     q_heads_kept: list[int]) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=10, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16)
    full = LlamaAttention(cfg)
    hd = full.head_dim
    q_rows, kv_rows = _head_rows(q_heads_kept, hd), _head_rows(kv_heads_kept, hd)
    narrow = copy.deepcopy(full)
    narrow.q_proj = _linear(full.q_proj.weight[q_rows])
    narrow.k_proj = _linear(full.k_proj.weight[kv_rows])
    narrow.v_proj = _linear(full.v_proj.weight[kv_rows])
    narrow.o_proj = _linear(full.o_proj.weight[:, q_rows])
    narrow.n_heads, narrow.n_kv_heads = len(q_heads_kept), len(kv_heads_kept)
    masked = copy.deepcopy(full)
    _zero_other_columns(masked.o_proj, q_rows)
    x = torch.randn(2, 16, 32)
    expected = masked(x)
    assert not torch.allclose(expected, full(x), atol=1e-4)
    torch.testing.assert_close(narrow(x), expected, atol=1e-5, rtol=1e-5)


def test_vit_attention_narrowed_equals_masked_full() -> None:
    torch.manual_seed(0)
    dim, heads, keep = 32, 4, [1, 3]
    full = VitAttention(dim, heads)
    hd = full.head_dim
    per_chunk = _head_rows(keep, hd)
    rows = torch.cat([c * dim + per_chunk for c in range(3)])
    narrow = copy.deepcopy(full)
    narrow.qkv = _linear(full.qkv.weight[rows], full.qkv.bias[rows])
    narrow.proj = _linear(full.proj.weight[:, per_chunk], full.proj.bias)
    narrow.num_heads = len(keep)
    masked = copy.deepcopy(full)
    _zero_other_columns(masked.proj, per_chunk)
    x = torch.randn(2, 9, dim)
    expected = masked(x)
    assert not torch.allclose(expected, full(x), atol=1e-4)
    torch.testing.assert_close(narrow(x), expected, atol=1e-5, rtol=1e-5)


def test_mlps_narrowed_equal_masked_full() -> None:
    torch.manual_seed(0)
    keep = torch.tensor([0, 3, 4, 9, 17])
    mlp = Mlp(8, 20)
    narrow = Mlp(8, 20)
    narrow.fc1 = _linear(mlp.fc1.weight[keep], mlp.fc1.bias[keep])
    narrow.fc2 = _linear(mlp.fc2.weight[:, keep], mlp.fc2.bias)
    masked = copy.deepcopy(mlp)
    _zero_other_columns(masked.fc2, keep)
    x = torch.randn(3, 8)
    torch.testing.assert_close(narrow(x), masked(x))
    ff = FeedForward(8, 20)
    narrow_ff = FeedForward(8, 20)
    narrow_ff.gate_proj = _linear(ff.gate_proj.weight[keep])
    narrow_ff.up_proj = _linear(ff.up_proj.weight[keep])
    narrow_ff.down_proj = _linear(ff.down_proj.weight[:, keep])
    masked_ff = copy.deepcopy(ff)
    _zero_other_columns(masked_ff.down_proj, keep)
    torch.testing.assert_close(narrow_ff(x), masked_ff(x))
    assert not torch.allclose(masked_ff(x), ff(x))


def test_tiny_llama_overfits_a_sequence() -> None:
    model = materialize(lambda: llama_tiny(n_layers=2), seed=0)
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 65, (1, 33), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        logits = model(seq[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(65)) < 0.3
    assert losses[-1] < 0.2 * losses[0]


def test_registry_and_factory_specs() -> None:
    with torch.device("meta"):
        model = get_model("vit_s4", dim=32, depth=1, num_heads=2, num_classes=4)
    assert model.head.out_features == 4 and len(model.blocks) == 1
    with pytest.raises(ValueError, match="resnet18.*vit_s4|known models"):
        get_model("resnet19")
    assert load_model_factory("subnetdp.models.resnet:resnet18") is resnet18
    dotted = load_model_factory("subnetdp.models:MODELS.get")  # a dotted path after the colon
    assert dotted == MODELS.get and dotted("resnet18") is resnet18
    for bad in ("subnetdp.models.resnet", "subnetdp.models.resnet:", ":resnet18",
                "subnetdp.no_such_module:f", "subnetdp.models.resnet:resnet19"):
        with pytest.raises(ValueError, match=r"module:callable") as info:
            load_model_factory(bad)
        assert repr(bad) in str(info.value)


# what callers offer the zoo's table: every dimension a data set or a flag may fix
OFFERED = {"num_classes": 7, "in_channels": 1, "img_size": 32, "width": 8, "vocab_size": 50, "max_seq_len": 16}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_the_zoo_table_knows_what_each_model_takes_and_its_defaults(name: str) -> None:
    """Issue 20 item 4: one table knows each model's kind, dimensions, defaults and whether it is
    convolutional; a factory passes exactly the dimensions the model takes, and they reach the model."""
    m = ZOO[name]
    assert m.kind in (IMAGE, LANGUAGE) and set(m.defaults) == set(m.dims) and model_kind(name) == m.kind
    factory = m.factory(**OFFERED, unknown_dimension=3)
    assert factory.keywords == {d: OFFERED[d] for d in m.dims}
    assert m.factory(width=None).keywords == {}  # None leaves the builder's default
    with torch.device("meta"):
        built, default = factory(), m.build()
    if m.kind == LANGUAGE:
        assert (built.config.vocab_size, built.config.max_seq_len) == (50, 16)
        assert (default.config.vocab_size, default.config.max_seq_len) == (m.defaults["vocab_size"],
                                                                           m.defaults["max_seq_len"])
        assert not m.convolutional
        return
    for model, dims in ((built, OFFERED), (default, m.defaults)):
        convs = [c for c in model.modules() if isinstance(c, nn.Conv2d)]
        head = [lin for lin in model.modules() if isinstance(lin, nn.Linear)][-1]
        assert head.out_features == dims["num_classes"] and convs[0].in_channels == dims["in_channels"]
        if m.takes("width"):  # ResNet's stem width, Swin's embedding width
            assert convs[0].out_channels == dims["width"]
        assert m.convolutional == (len(convs) > 1)  # a body of convolutions, not one patch embedding


def test_model_factory_builds_zoo_names_and_module_callables_alike() -> None:
    """The one way a name becomes a model: a zoo name takes its dimensions, a 'module:callable' gets only
    those a user's callable is called with (num_classes, or vocab_size and max_seq_len), checked."""
    assert model_factory("resnet18", **OFFERED).keywords == {"num_classes": 7, "in_channels": 1, "width": 8}
    with pytest.raises(ValueError, match="cannot be called with num_classes=, vocab_size=, max_seq_len="):
        model_factory("subnetdp.models.resnet:resnet18", **OFFERED)  # no vocabulary: named before any build
    assert model_factory("subnetdp.models.resnet:resnet18", num_classes=7, width=8)().fc.out_features == 7
    assert model_kind("subnetdp.models.resnet:resnet18") is None
    assert zoo_names(LANGUAGE) == ("llama_tiny", "llama_char_small", "llama_125m")
    assert zoo_names(takes="width") == ("resnet18", "resnet50", "swin_t_cifar")
    with pytest.raises(ValueError, match="known models"):
        zoo_model("resnet19")


def test_no_module_outside_the_zoo_tests_model_names() -> None:
    """Names are looked up in the table (models/zoo.py), not tested: no ``startswith("llama")`` and no list of
    two or more zoo names anywhere else in src/subnetdp."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "subnetdp"
    found = []
    for path in src.rglob("*.py"):
        if path.parent.name == "models":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith"
                    and any(isinstance(a, ast.Constant) and str(a.value) in ("llama", "resnet", "vit", "swin")
                            for a in node.args)):
                found.append(f"{path.name}:{node.lineno} startswith")
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                zoo = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in ZOO]
                if len(zoo) >= 2:
                    found.append(f"{path.name}:{node.lineno} {zoo}")
    assert not found, found
