"""Users' own models without user code: Hugging Face GPT-2 and Llama, a timm ViT, and HF tokenizers.

Needs the optional packages (``pip install subnetdp[hf]``); each test skips without them.
"""

from __future__ import annotations

import pytest
import torch
from distributed import run_ranks, values
from test_llama_sdp import lm_loss, masked_full_model, token_batches
from torch import nn
from torch.nn import functional as F

import subnetdp as sd
from subnetdp.config import TrainConfig

VOCAB = 65
STEPS = 3


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                                      bos_token_id=0, eos_token_id=0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def timm_vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                             embed_dim=32, depth=2, num_heads=4)


MODELS = {"gpt2": (gpt2, "transformers"), "hf_llama": (hf_llama, "transformers"), "timm_vit": (timm_vit, "timm")}
EXPECTED = {  # block paths; width groups as (name, units)
    "gpt2": (["transformer.h.0", "transformer.h.1"],
             [("transformer.h.0.attn:heads", 4), ("transformer.h.0.mlp:width", 128)]),
    "hf_llama": (["model.layers.0", "model.layers.1"],
                 [("model.layers.0.self_attn:heads", 2), ("model.layers.0.mlp:width", 64)]),
    "timm_vit": (["blocks.0", "blocks.1"], [("blocks.0.attn:heads", 4), ("blocks.0.mlp:width", 128)]),
}


def factory(name: str):
    f, package = MODELS[name]
    pytest.importorskip(package)
    return f


def batches(name: str, workers: int, seed: int = 0) -> list:
    if name == "timm_vit":
        g = torch.Generator().manual_seed(seed)
        return [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g))
                for _ in range(workers)]
    return token_batches(workers, n=2, seq=12, seed=seed)


def loss_of(name: str):
    return (lambda m, b: F.cross_entropy(m(b[0]), b[1])) if name == "timm_vit" else lm_loss


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocks_and_widths_are_found(name):
    f = factory(name)
    blocks, groups = EXPECTED[name]
    block = sd.plan(f, 2, 0.5, "block")
    assert [u.name for u in block.units] == blocks
    neuron = sd.plan(f, 2, 0.5, "neuron")
    found = {g.name: g.size for g in neuron.groups}
    assert len(found) == 4 and all(found[g] == size for g, size in groups)
    assert neuron.always_kept  # embeddings, norms, head


@pytest.mark.parametrize("name", sorted(MODELS))
def test_seeded_init_follows_the_library_rule(name):
    """``init="per-module"``: every tensor has the distribution the library's own init gives it (buffers exactly)."""
    f = factory(name)
    torch.manual_seed(0)
    theirs = f()
    ours = sd.materialize(f, seed=1, init="per-module")
    for (n, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        a, b = a.detach().float(), b.detach().float()
        if n in dict(theirs.named_buffers()) or float(a.std()) == 0:  # rotary tables, zeros, ones
            torch.testing.assert_close(b, a, msg=n)
        elif a.numel() >= 64:  # enough elements for the moments to say which rule drew them
            assert abs(float(b.std()) - float(a.std())) < 0.2 * float(a.std()), n
            assert abs(float(b.mean()) - float(a.mean())) < 0.2 * float(a.std()), n
    assert not torch.equal(next(ours.parameters()), next(sd.materialize(f, seed=2, init="per-module").parameters()))
    if name == "gpt2":  # tied head; residual projections scaled by 1/sqrt(2 * n_layer) by their parent module
        assert ours.lm_head.weight is ours.transformer.wte.weight
        assert abs(float(ours.transformer.h[0].mlp.c_proj.weight.detach().std()) - 0.01) < 0.002


@pytest.mark.parametrize("name", sorted(MODELS))
def test_neuron_subnetwork_equals_the_full_model_without_the_units_it_lacks(name):
    f = factory(name)
    p = sd.plan(f, 2, 0.5, "neuron")
    x = batches(name, 1)[0][0]
    for k in range(2):
        sub = sd.build_subnetwork(f, p, k, seed=3, neuron_scaling="none").eval()
        ref = masked_full_model(f, p, k, seed=3).eval()
        torch.testing.assert_close(output(sub, x), output(ref, x), rtol=1e-5, atol=1e-5)


def train_both_levels(rank: int, world: int, names: list[str]) -> dict:
    out = {}
    for name in names:
        f = MODELS[name][0]
        for level in ("block", "neuron"):
            sdp = sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, level), seed=5)
            opt = torch.optim.SGD(sdp.parameters(), lr=0.1, momentum=0.9)
            for step in range(STEPS):
                opt.zero_grad()
                loss_of(name)(sdp, batches(name, world, seed=step)[rank]).backward()
                opt.step()
            out[name, level] = ({n: t.detach().clone() for n, t in sdp.module.named_parameters()},
                                sdp.full_state_dict())
    return out


def test_trained_on_two_ranks_equals_simulation_and_loads_into_the_plain_model():
    names = [n for n in sorted(MODELS) if _importable(MODELS[n][1])]
    if not names:
        pytest.skip("neither transformers nor timm is installed")
    ranks = values(run_ranks(train_both_levels, 2, names, timeout=240))
    for name in names:
        f = MODELS[name][0]
        for level in ("block", "neuron"):
            p = sd.plan(f, 2, 0.5, level)
            sim = sd.Simulation(f, p, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), seed=5)
            for step in range(STEPS):
                sim.step(batches(name, 2, seed=step), loss_of(name))
            for k in range(2):
                mine = dict(sim.workers[k].named_parameters())
                for n, t in ranks[k][name, level][0].items():
                    torch.testing.assert_close(t, mine[n].detach(), rtol=1e-5, atol=1e-6)
            plain = f()
            plain.load_state_dict(ranks[0][name, level][1])  # strict: every tensor, no extras
            assert ranks[1][name, level][1] is None
            assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                             sd.materialize(f, seed=5).state_dict().values()))


def _importable(package: str) -> bool:
    try:
        __import__(package)
    except ImportError:
        return False
    return True


def test_unrecognised_widths_list_candidates_and_can_be_named():
    """BERT's ``intermediate.dense -> output.dense`` is not a recognised pattern: the error lists paths."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)

    def bert() -> nn.Module:
        return transformers.BertModel(cfg, add_pooling_layer=False)

    with pytest.raises(ValueError, match=r"no maskable units.*Candidate module paths: \[.*'encoder.layer.0'"):
        sd.plan(bert, 2, 0.5, "neuron")
    pairs = [(f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense") for i in range(2)]
    p = sd.plan(bert, 2, 0.5, "neuron", width_pairs=pairs)
    assert [g.size for g in p.groups] == [64, 64]
    assert [u.name for u in sd.plan(bert, 2, 0.5, "block").units] == ["encoder.layer.0", "encoder.layer.1"]


def test_tokenizers_json_file_trains_a_text_task(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from subnetdp.data.text import get_tokenizer
    from subnetdp.tasks import TextTask

    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "corpus.txt").write_text(text)
    ours = get_tokenizer(f"tokenizers:{tmp_path / 'tokenizer.json'}")
    ids = ours.encode(text)
    assert ids.dtype.name == "int64" and len(ids) < len(text) / 2 and ours.decode(ids) == text

    cfg = TrainConfig(model="llama_tiny", dataset=str(tmp_path / "corpus.txt"), seq_len=16, batch_size=2)
    cfg.tokenizer = str(tmp_path / "tokenizer.json")  # a bare path to a tokenizer.json means the same
    task = TextTask(cfg, torch.device("cpu"))
    assert task.vocab_size == ours.vocab_size
    model = task.model_factory()()
    loss, _ = task.loss(model, task.loader(0, 1).batch(0))
    assert loss.isfinite()


def test_a_missing_tokenizer_package_is_named(monkeypatch):
    import builtins

    from subnetdp.data.text import get_tokenizer

    real = builtins.__import__

    def no_tiktoken(name, *args, **kwargs):
        if name == "tiktoken":
            raise ImportError("No module named 'tiktoken'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tiktoken)
    monkeypatch.delitem(__import__("sys").modules, "tiktoken", raising=False)
    with pytest.raises(ImportError, match="needs the 'tiktoken' package: pip install tiktoken"):
        get_tokenizer("tiktoken:gpt2")
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")
