"""The memory-budget planner: the largest coverage that fits, or a clear error."""

from __future__ import annotations

import pytest
import torch

import subnetdp as sd
from subnetdp.measure.meters import measure_choice
from subnetdp.measure.workloads import image_workload
from subnetdp.planning import memory_plan, plan, profile_activations
from subnetdp.planning.budget import parse_bytes, plan_for_budget, predicted_peak

W = image_workload(width=4)
K, BATCH, OPT = 4, 8, "sgd-momentum"


@pytest.fixture(scope="module")
def profile():
    return profile_activations(W.factory, W.make_batch(2, torch.device("cpu"), 0), W.loss_fn, 2)


@pytest.mark.parametrize("text,value", [("6GiB", 6 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                        ("4096", 4096), ("2 kib", 2048), (100, 100)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["6 gigs", "", "-1MiB", "0", "MiB"])
def test_parse_bytes_rejects_nonsense(text):
    with pytest.raises(ValueError, match="budget"):
        parse_bytes(text)


def peaks(profile):
    return {(c, lv): predicted_peak(memory_plan(W.factory, K, c, lv, profile=profile, optimizer=OPT, batch_size=BATCH),
                                    profile, OPT, BATCH)[0]
            for c in (1.0, 0.75, 0.5, 0.25) for lv in ("block", "neuron")}


def test_a_budget_that_fits_gets_the_largest_coverage(profile):
    table = peaks(profile)
    # between the best plan at C = 0.5 and the best at C = 0.75: C = 0.5 must be chosen
    budget = (min(table[(0.5, lv)] for lv in ("block", "neuron")) + min(table[(0.75, lv)] for lv in ("block", "neuron"))) // 2
    choice = plan_for_budget(W, K, budget, optimizer=OPT, batch_size=BATCH, profile=profile)
    assert choice.plan.coverage == 0.5
    assert choice.peak <= budget and choice.peak == table[(0.5, choice.plan.level)]
    if table[(0.5, "block")] <= budget:
        assert choice.plan.level == "block"  # preferred at equal coverage
    assert "fits" in choice.summary()


def test_everything_fits_gives_coverage_one(profile):
    choice = plan_for_budget(W, K, "1GiB", optimizer=OPT, batch_size=BATCH, profile=profile)
    assert choice.plan.coverage == 1.0 and choice.plan.level == "block"


def test_a_budget_that_cannot_fit_names_the_smallest_peak(profile):
    smallest = min(peaks(profile).values())
    with pytest.raises(ValueError, match="smallest predicted peak is") as e:
        plan_for_budget(W, K, smallest - 1, optimizer=OPT, batch_size=BATCH, profile=profile)
    from subnetdp.metrics import format_bytes

    assert format_bytes(smallest) in str(e.value)
    assert plan_for_budget(W, K, smallest, optimizer=OPT, batch_size=BATCH, profile=profile).peak == smallest


def test_the_chosen_plan_measures_close_to_its_prediction(profile):
    choice = plan_for_budget(W, K, "64MiB", optimizer=OPT, batch_size=BATCH, levels=("neuron",), profile=profile)
    r = measure_choice(choice, W)
    assert r["ratio"] == pytest.approx(1.0, abs=0.15)  # the profile was taken at batch 2 and scaled to 8


def test_command_line(capsys):
    from subnetdp.cli import main

    flags = ["plan", "--width", "4", "--workers", "4", "--optimizer", "sgd", "--batch-size", "4"]
    assert main(flags + ["--budget", "1GiB"]) == 0
    assert "coverage C=1" in capsys.readouterr().out
    assert main(flags + ["--budget", "1KiB"]) == 2
    assert "smallest predicted peak" in capsys.readouterr().err


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_json_parses_and_equals_the_library_prediction(capsys, checkpointing):
    import json

    from subnetdp.planning import plan_prediction, profile_workload
    from subnetdp.cli import main
    from subnetdp.planning import memory_plan, predict_worker

    flags = ["plan", "--model", "resnet18", "--width", "4", "--workers", "4", "--coverage", "0.5", "--level", "block",
             "--batch-size", "16", "--optimizer", "sgd", "--transitions", "shortcut", "--json"]
    assert main(flags + (["--activation-checkpointing"] if checkpointing else [])) == 0
    out = json.loads(capsys.readouterr().out)  # one JSON object, nothing else on stdout
    assert {"workers", "coverage", "level", "optimizer", "batch_size", "activation_checkpointing", "peak_bytes",
            "ddp_peak_bytes", "state_bytes", "activation_bytes"} <= set(out)
    assert (out["workers"], out["coverage"], out["level"], out["batch_size"]) == (4, 0.5, "block", 16)
    assert out["activation_checkpointing"] is checkpointing and out["balance"] == "memory"
    profile = profile_workload(W)  # the CLI's workload: resnet18 width 4, 10 classes, profiled on 2 samples
    p = memory_plan(W.factory, 4, 0.5, "block", profile=profile, optimizer="sgd", batch_size=16,
                    transitions="shortcut", activation_checkpointing=checkpointing)
    assert out["plan_digest"] == p.digest()
    for k in range(4):
        pred = predict_worker(p, k, "sgd", profile, 16, activation_checkpointing=checkpointing)
        assert out["peak_bytes"][k] == pred["peak_bytes"]
        assert out["state_bytes"][k] == pred["state_bytes"] and out["activation_bytes"][k] == pred["activation_bytes"]
    ddp = predict_worker(plan(W.factory, 4, 1.0, "block"), 0, "sgd", profile, 16,
                         activation_checkpointing=checkpointing)
    assert out["ddp_peak_bytes"] == ddp["peak_bytes"] > max(out["peak_bytes"])
    assert plan_prediction(W, 4, 0.5, optimizer="sgd", batch_size=16, transitions="shortcut",
                           activation_checkpointing=checkpointing)[1] == {**out, "model": W.name}


def test_plan_json_predicts_backward_masking(capsys):
    """--masking backward: full parameters, held gradients and optimizer state (issue 14's prediction)."""
    import json

    from subnetdp.planning import profile_workload
    from subnetdp.cli import main
    from subnetdp.planning import memory_plan, predict_backward_worker, profile_weight_grads

    flags = ["plan", "--model", "resnet18", "--width", "4", "--workers", "4", "--coverage", "0.5", "--level", "block",
             "--batch-size", "16", "--optimizer", "sgd", "--json"]
    assert main(flags) == 0
    forward = json.loads(capsys.readouterr().out)
    assert main(flags + ["--masking", "backward"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["masking"] == "backward" and forward["masking"] == "forward"
    profile = profile_workload(W)
    grads = profile_weight_grads(W.factory, W.make_batch(profile.batch_size, torch.device("cpu"), 0), W.loss_fn,
                                 plan(W.factory, 4, 1.0, "block"))
    p = memory_plan(W.factory, 4, 0.5, "block", profile=profile, optimizer="sgd", batch_size=16,
                    masking="backward", weight_grads=grads)
    full_params = sum(t.numel() for t in sd.materialize(W.factory).parameters()) * 4
    for k in range(4):
        pred = predict_backward_worker(p, k, "sgd", profile, grads, 16)
        assert out["state_bytes"][k] == pred["state_bytes"]
        assert out["activation_bytes"][k] == pred["activation_bytes"]
        assert out["peak_bytes"][k] == pred["total_bytes"] + out["transient_bytes"][k]
        assert pred["param_bytes"] == full_params
    assert main(flags + ["--masking", "backward", "--activation-checkpointing"]) == 2
    assert "does not model backward masking with activation checkpointing" in capsys.readouterr().err


def test_plan_command_rejects_bad_values_in_one_line(capsys):
    from subnetdp.cli import main

    assert main(["plan", "--width", "4", "--workers", "4", "--coverage", "0.3", "--json"]) == 2
    assert "coverage=0.3" in capsys.readouterr().err
    assert main(["plan", "--width", "4", "--batch-size", "0", "--json"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err


@pytest.mark.parametrize("workload,opt,batch", [(W, "sgd-momentum", 16), (None, "adamw", 4)])
def test_backward_masking_plans_balance_what_differs_between_its_workers(workload, opt, batch):
    """Under backward masking every worker holds the full parameters and (almost) the full forward's
    activations: a plan balanced on forward masking's costs left the ResNet's worst worker with more
    held state (7.85 against 7.25 MiB at width 16) than one balanced on backward masking's own."""
    from subnetdp.planning import backward_weight_grads, profile_workload
    from subnetdp.planning import predict_backward_worker
    from subnetdp.measure.workloads import text_workload

    w = workload or text_workload("llama_char_small", seq_len=16)
    profile = profile_workload(w)
    grads = backward_weight_grads(w, K, "block", 0, profile)

    def worst(p):
        return max(predict_backward_worker(p, k, opt, profile, grads, batch)["total_bytes"] for k in range(K))

    backward = memory_plan(w.factory, K, 0.5, "block", profile=profile, optimizer=opt, batch_size=batch,
                           masking="backward", weight_grads=grads)
    forward = memory_plan(w.factory, K, 0.5, "block", profile=profile, optimizer=opt, batch_size=batch)
    params = plan(w.factory, K, 0.5, "block")
    assert worst(backward) <= min(worst(forward), worst(params))
    if workload is W:
        assert worst(backward) < worst(forward)
    with pytest.raises(ValueError, match="weight_grads"):
        memory_plan(w.factory, K, 0.5, "block", profile=profile, optimizer=opt, masking="backward")


@pytest.mark.parametrize("level,masking", [("block", "forward"), ("neuron", "forward"), ("block", "backward")])
def test_memory_balanced_plan_is_the_plan_of_plan_json(capsys, level, masking):
    """subnetdp.memory_balanced_plan, given the model, a sample batch and the optimizer, returns exactly the
    plan `subnetdp plan` (and `subnetdp train`, tests/test_cli.py) makes by default; subnetdp.plan balances
    parameter counts and differs."""
    import json

    from subnetdp.cli import main

    assert main(["plan", "--model", "resnet18", "--width", "4", "--workers", "4", "--coverage", "0.5", "--level", level,
                 "--batch-size", "16", "--optimizer", "sgd", "--masking", masking, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    sample = (torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))  # any values: saved bytes depend on shapes
    p = sd.memory_balanced_plan(W.factory, 4, 0.5, level, sample=sample, loss_fn=W.loss_fn, batch_size=16,
                                optimizer="sgd", masking=masking)
    assert p.balance == "memory" and p.digest() == out["plan_digest"]
    if level == "block":
        assert sd.plan(W.factory, 4, 0.5, level).digest() != p.digest()


def test_plan_builds_a_module_callable_model_as_train_does(tmp_path, capsys):
    """--num-classes reaches a 'module:callable' model (torchvision's resnet34 takes it through **kwargs),
    --vocab-size and --seq-len reach a language model; --width is refused as train refuses it."""
    from subnetdp.cli import main
    from subnetdp.planning import Plan

    def saved(*flags: str) -> dict[str, tuple[int, ...]]:
        path = tmp_path / "plan.json"
        assert main(["plan", "--workers", "2", "--coverage", "0.5", "--save", str(path), *flags]) == 0
        return dict(Plan.from_json(path.read_text()).tensors)

    assert saved("--model", "torchvision.models:resnet34", "--num-classes", "10")["fc.weight"] == (10, 512)
    assert saved("--model", "subnetdp.models:resnet18", "--num-classes", "7")["fc.weight"][0] == 7
    tensors = saved("--model", "subnetdp.models:llama_tiny", "--vocab-size", "50", "--seq-len", "16")
    assert tensors["tok_embeddings.weight"][0] == 50
    capsys.readouterr()
    assert main(["plan", "--model", "subnetdp.models:resnet18", "--width", "8"]) == 2
    assert "--width applies to resnet18" in capsys.readouterr().err


def test_plan_json_predicts_each_units_state_sharded_over_its_holders(capsys):
    import json

    from subnetdp.cli import main
    from subnetdp.planning import predict_sharded_worker, predict_worker, profile_workload

    flags = ["plan", "--model", "resnet18", "--width", "4", "--workers", "4", "--coverage", "0.5", "--level", "block",
             "--batch-size", "16", "--optimizer", "adamw", "--json"]
    assert main(flags) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(flags + ["--sharding", "holders"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert (whole["sharding"], sharded["sharding"]) == ("none", "holders")
    profile = profile_workload(W)
    # the plan --sharding holders trains: balanced on the state each worker keeps with its units split over holders
    p = memory_plan(W.factory, 4, 0.5, "block", profile=profile, optimizer="adamw", batch_size=16, sharding="holders")
    assert sharded["plan_digest"] == p.digest()
    for k in range(4):
        pred = predict_sharded_worker(p, k, "adamw", profile, 16)
        assert sharded["peak_bytes"][k] == pred["peak_bytes"] and sharded["state_bytes"][k] == pred["state_bytes"]
        unsharded = predict_worker(p, k, "adamw", profile, 16)  # the same plan's workers, stored whole
        assert sharded["activation_bytes"][k] == unsharded["activation_bytes"]  # sharding moves no activation
        assert sharded["state_bytes"][k] < unsharded["state_bytes"]
    # FSDP2 is the sharded prediction at coverage 1 (every block over all K), the same in both outputs
    full = plan(W.factory, 4, 1.0, "block")
    assert whole["fsdp2_peak_bytes"] == sharded["fsdp2_peak_bytes"] == max(
        predict_sharded_worker(full, k, "adamw", profile, 16)["peak_bytes"] for k in range(4))
    assert main(flags[:-1] + ["--sharding", "holders"]) == 0
    assert "x FSDP2's" in capsys.readouterr().out
    assert main(flags + ["--sharding", "holders", "--level", "neuron"]) == 2
    assert "--sharding holders needs --level block" in capsys.readouterr().err


def test_the_budget_planner_takes_sharding_only_where_it_fits_a_larger_coverage(profile):
    both = ("none", "holders")

    def worst(c, sharding):
        p = memory_plan(W.factory, K, c, "block", profile=profile, optimizer=OPT, batch_size=BATCH, sharding=sharding)
        return predicted_peak(p, profile, OPT, BATCH, sharding)[0]

    whole, split = worst(0.75, "none"), worst(0.75, "holders")
    assert split < whole
    # fits C=0.75 only sharded (and C=0.5 unsharded does not matter: the larger coverage wins)
    choice = plan_for_budget(W, K, split, optimizer=OPT, batch_size=BATCH, profile=profile, levels=("block",),
                             shardings=both)
    assert (choice.plan.coverage, choice.sharding, choice.peak) == (0.75, "holders", split)
    assert "--sharding holders" in choice.summary()
    # at equal coverage the unsharded plan wins (fewer bytes handed to collectives)
    choice = plan_for_budget(W, K, whole, optimizer=OPT, batch_size=BATCH, profile=profile, levels=("block",),
                             shardings=both)
    assert (choice.plan.coverage, choice.sharding) == (0.75, "none")
    assert plan_for_budget(W, K, "1GiB", optimizer=OPT, batch_size=BATCH, profile=profile,
                           shardings=both).sharding == "none"
    with pytest.raises(ValueError, match="shardings"):
        plan_for_budget(W, K, "1GiB", optimizer=OPT, batch_size=BATCH, profile=profile, shardings=("split",))


def test_budget_measure_refuses_a_sharded_choice_in_one_line(capsys):
    from subnetdp.cli import main

    flags = ["plan", "--width", "4", "--workers", "4", "--optimizer", "sgd", "--batch-size", "4"]
    assert main(flags + ["--budget", "1GiB", "--sharding", "holders", "--measure"]) == 2
    err = capsys.readouterr().err
    assert "--measure" in err and "subnetdp bench --sharding holders" in err
