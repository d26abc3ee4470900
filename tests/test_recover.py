"""Recovery after pruning (oneshot/recover): the pure losses and schedules, masks locked through full
fine-tuning and through a LoRA merge, a loss that falls on a learnable corpus, zero KL to oneself,
bitwise-equal resume, iterative stages, structured models, and bad input refused in one line."""
import copy
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from oneshot.cli import main
from oneshot.methods import parse_pattern
from oneshot.methods.magnitude import magnitude_prune
from oneshot.models import build_random_model, decoder_blocks, get_weight, prunable_layers, set_weight
from oneshot.recover import (TrainCheckpoint, apply_masks, capture_masks, distillation_loss, lr_factor,
                             next_token_loss, recovery_loss, stage_sparsity, train, zero_fraction)
from oneshot.spec import Recovery

FAST = ["--nsamples", "4", "--seqlen", "32", "--eval-samples", "1", "--quiet"]


def pruned_tiny(pattern: str = "unstructured", sparsity: float = 0.5, preset: str = "tiny-llama"):
    """A fresh tiny model with every block linear pruned by magnitude (the same weights every call)."""
    model = build_random_model(preset, torch.float32, seed=0)
    for block in decoder_blocks(model):
        for layer in prunable_layers(block).values():
            set_weight(layer, magnitude_prune(get_weight(layer), sparsity, parse_pattern(pattern)).weight)
    return model


def toy_windows(rows: int = 8, seqlen: int = 32) -> torch.Tensor:
    """A learnable corpus: the same short cycle of tokens over and over."""
    return (torch.arange(rows * seqlen).reshape(rows, seqlen) % 5 + 40).long()


def equal_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- pure cores -----------------------------------------------------------------------------------

def test_losses_are_pure_functions_of_logits():
    torch.manual_seed(0)
    logits, other = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    manual = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    assert torch.allclose(next_token_loss(logits, ids), manual)
    assert distillation_loss(logits, logits.clone(), 2.0).item() == 0.0  # self-distillation: exactly zero
    assert distillation_loss(logits, other).item() > 0
    t = 3.0  # T^2 scaling: the KL of the softened distributions, times T^2
    p, q = torch.log_softmax(other[:, :-1] / t, -1), torch.log_softmax(logits[:, :-1] / t, -1)
    expected = (p.exp() * (p - q)).sum(-1).mean() * t * t
    assert torch.allclose(distillation_loss(logits, other, t), expected, atol=1e-6)
    mixed = recovery_loss(logits, ids, other, 1.0, 0.25)
    assert torch.allclose(mixed, 0.25 * distillation_loss(logits, other) + 0.75 * next_token_loss(logits, ids))
    assert torch.equal(recovery_loss(logits, ids), next_token_loss(logits, ids))


def test_schedules():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "linear") == 1.0 and lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(0, 10, 0, "cosine") == 1.0 and lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5)
    linear = [stage_sparsity(k, 3, 0.6, "linear") for k in (1, 2, 3)]
    cubic = [stage_sparsity(k, 3, 0.6, "cubic") for k in (1, 2, 3)]
    assert linear == pytest.approx([0.2, 0.4, 0.6])
    assert cubic == pytest.approx([0.6 * (1 - (2 / 3) ** 3), 0.6 * (1 - (1 / 3) ** 3), 0.6])
    assert cubic[-1] == 0.6 and cubic[0] > linear[0]  # cubic prunes most of it early


# ---- the loop ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_masks_stay_locked(mode, pattern):
    model = pruned_tiny(pattern)
    before = capture_masks(model)
    original = copy.deepcopy(model)
    result = train(model, toy_windows(), Recovery(mode=mode, steps=3, lr=1e-2, batch_size=2), progress=False)
    after = capture_masks(result.model)
    assert result.masks_held and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # identical zero patterns
    changed = [k for k, p in result.model.named_parameters() if not torch.equal(p, dict(original.named_parameters())[k])]
    assert changed  # it did train (LoRA: the merged q/v projections)
    if mode == "lora":
        assert all("q_proj" in k or "v_proj" in k for k in changed)
        assert not any("lora" in k for k, _ in result.model.named_parameters())  # merged and unloaded
    if pattern == "2:4":
        for block in decoder_blocks(result.model):
            for layer in prunable_layers(block).values():
                groups = get_weight(layer).reshape(-1, 4)
                assert bool(((groups == 0).sum(dim=1) >= 2).all())


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_masked_lora_trains_the_model_that_is_saved(preset):
    """With the masked update the adapted model and the merged, re-masked one give the same logits (what
    trained is what is saved); with peft's dense update the merge's masking changes them."""
    from oneshot.recover import lora

    ids = toy_windows(2, 16)
    for update, same in (("masked", True), ("dense", False)):
        model = pruned_tiny(preset=preset)
        masks = capture_masks(model)
        torch.manual_seed(1)
        wrapped = lora.wrap(model, lora.default_targets(model), masks=masks, update=update)
        with torch.no_grad():
            for name, parameter in wrapped.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.5)  # a trained adapter: B is no longer zero
        wrapped.eval()
        with torch.no_grad():
            adapted = wrapped(input_ids=ids).logits
            merged = lora.merge(wrapped)
            apply_masks(merged, masks)
            saved = merged(input_ids=ids).logits
        assert torch.allclose(adapted, saved, atol=1e-5) == same, update
        assert not any(hasattr(module, lora.KEEP) for module in merged.modules())


def test_loss_falls_on_a_learnable_corpus():
    result = train(pruned_tiny(), toy_windows(), Recovery(steps=8, lr=1e-2, batch_size=4, schedule="constant"),
                   progress=False)
    curve = result.loss_curve
    assert curve[-1] < curve[0] - 1.0 and sum(b < a for a, b in zip(curve, curve[1:])) >= 6  # nats, steadily


def test_self_distillation_has_zero_kl():
    model = pruned_tiny()
    result = train(model, toy_windows(), Recovery(steps=2, lr=1e-3, batch_size=2), teacher=copy.deepcopy(model),
                   progress=False)
    assert result.loss_curve[0] == 0.0


def test_evaluations_inside_the_loop_are_not_training_time(monkeypatch):
    """seconds (and so seconds per step) counts the steps only: a fake clock that only an evaluation
    advances must give zero training seconds, and the evaluation still sees the model at its step."""
    import sys
    loop = sys.modules["oneshot.recover.train"]  # the module (the package exports the function as train)
    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])

    def evaluate(model):
        clock[0] += 100.0
        return {"ok": 1.0}

    result = train(pruned_tiny(), toy_windows(), Recovery(steps=3, lr=1e-3, batch_size=2, eval_at=(1, 2)),
                   progress=False, evaluate=evaluate)
    assert clock[0] == 200.0 and sorted(result.evaluations) == [1, 2]
    assert result.seconds == 0.0


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_is_bitwise_equal(mode, tmp_path):
    settings = Recovery(mode=mode, steps=4, lr=1e-2, batch_size=2)
    straight = train(pruned_tiny(), toy_windows(), settings, progress=False)
    checkpoint = TrainCheckpoint(tmp_path / "c", {"test": mode})
    train(pruned_tiny(), toy_windows(), settings, checkpoint=checkpoint, progress=False, stop_after=2,
          checkpoint_every=2)
    assert json.loads((tmp_path / "c" / "state.json").read_text())["step"] == 2
    resumed = train(pruned_tiny(), toy_windows(), settings, checkpoint=TrainCheckpoint(tmp_path / "c", {"test": mode}),
                    resume=True, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps_run == 2
    assert resumed.loss_curve == straight.loss_curve
    assert equal_state(straight.model, resumed.model)


# ---- through the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    assert main(["prune", "--model", "random:tiny-llama", "--method", "sparsegpt", "--sparsity", "0.5", *FAST,
                 "--save-model", str(root / "model")]) == 0
    tokens = root / "toy.pt"
    torch.save(toy_windows(16, 32), tokens)
    return root / "model", tokens


def _saved_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_recover_command_records_and_saves(pruned_dir, tmp_path, capsys):
    model_dir, tokens = pruned_dir
    out, saved = tmp_path / "out", tmp_path / "rec"
    assert main(["recover", "--pruned", str(model_dir), "--steps", "6", "--lr", "3e-3", "--batch-size", "4",
                 "--train-data", f"tokens:{tokens}", "--seqlen", "32", "--eval-samples", "1", "--quiet",
                 "--eval-at", "3", "--output", str(out), "--save-model", str(saved)]) == 0
    assert "before recovery" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    recovery = result["recovery"]
    assert result["model"] == "random:tiny-llama" and result["method"] == "sparsegpt"
    assert recovery["mode"] == "full" and recovery["steps"] == 6 and recovery["tokens"] == 6 * 4 * 32
    assert len(recovery["loss_curve"]) == 6 and recovery["loss_curve"][-1] < recovery["loss_curve"][0]
    assert set(recovery["ppl_before"]) == set(recovery["ppl_after"]) == {"wiki-offline"}
    assert list(recovery["ppl_at"]) == ["3"] and recovery["masks_locked"]
    assert recovery["sparsity_after"] == recovery["sparsity_before"] == pytest.approx(0.5, abs=0.01)
    assert recovery["seconds_per_step"] > 0
    lineage = json.loads((saved / "oneshot.json").read_text())
    assert lineage["model"] == "random:tiny-llama" and lineage["recovery"]["steps"] == 6
    assert "recovered after pruning (full)" in (saved / "README.md").read_text()
    before, after = _saved_tensors(model_dir), _saved_tensors(saved)
    for name, tensor in before.items():
        if "proj" in name:
            assert torch.equal(tensor == 0, after[name] == 0), name  # the zero pattern, exactly
    # a recovered model is a pruned model too: it can be recovered again, and distilled from its base
    assert main(["recover", "--pruned", str(saved), "--steps", "1", "--batch-size", "1", "--train-seqlen", "32",
                 "--seqlen", "32", "--eval-ppl", "none", "--distill", "--mode", "lora", "--quiet",
                 "--output", str(tmp_path / "again")]) == 0


def test_recover_command_resumes_bitwise(pruned_dir, tmp_path):
    model_dir, tokens = pruned_dir
    common = ["recover", "--pruned", str(model_dir), "--steps", "4", "--lr", "3e-3", "--batch-size", "2",
              "--train-data", f"tokens:{tokens}", "--eval-ppl", "none", "--quiet", "--checkpoint-dir",
              str(tmp_path / "ckpt"), "--checkpoint-every", "2"]
    assert main([*common, "--save-model", str(tmp_path / "a")]) == 0  # leaves the step-2 checkpoint behind
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 2
    assert main([*common, "--resume", "--save-model", str(tmp_path / "b")]) == 0
    a, b = _saved_tensors(tmp_path / "a"), _saved_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "oneshot.json").read_text())["recovery"]["resumed_from_step"] == 2


def test_prune_with_recovery_and_iterative_stages(tmp_path):
    out = tmp_path / "it"
    assert main(["prune", "--model", "random:tiny-llama", "--method", "sparsegpt", "--sparsity", "0.6", *FAST,
                 "--iterative", "3", "--iterative-schedule", "cubic", "--recover-steps", "2",
                 "--recover-batch-size", "2", "--recover-seqlen", "32", "--distill", "--output", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    stages = result["stages"]
    assert [s["stage"] for s in stages] == [1, 2, 3]
    assert [s["sparsity_target"] for s in stages] == pytest.approx([stage_sparsity(k, 3, 0.6, "cubic") for k in (1, 2, 3)])
    measured = [s["sparsity"] for s in stages]
    assert measured == sorted(measured) and measured[-1] == pytest.approx(0.6, abs=0.01)
    assert all(len(s["loss_curve"]) == 2 and s["ppl_pruned"] and s["ppl_recovered"] for s in stages)
    assert result["recovery"]["distill"]["teacher"] == "random:tiny-llama"
    assert result["sparsity_measured"] == pytest.approx(measured[-1], abs=1e-3)


@pytest.mark.parametrize("extra", [["--pattern", "width", "--method", "wanda", "--sparsity", "0.25"],
                                   ["--pattern", "2:4", "--method", "wanda", "--recover-mode", "lora"]])
def test_prune_then_recover_in_one_run(extra, tmp_path):
    assert main(["prune", "--model", "random:tiny-llama", *FAST, *extra, "--recover-steps", "2",
                 "--recover-batch-size", "2", "--recover-seqlen", "32", "--output", str(tmp_path / "o")]) == 0
    recovery = json.loads((tmp_path / "o" / "result.json").read_text())["recovery"]
    assert recovery["masks_locked"] and recovery["sparsity_after"] == recovery["sparsity_before"]
    assert all(math.isfinite(v) for v in recovery["ppl_after"].values())


def test_recovery_from_a_run_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: random:tiny-llama\nmethod: magnitude\nsparsity: 0.5\n"
                      "calibration: {nsamples: 2, seqlen: 32}\neval: {samples: 1}\n"
                      "recover: {mode: lora, steps: 2, batch_size: 2, seqlen: 32, eval_at: [1]}\n")
    assert main(["prune", "--config", str(config), "--quiet", "--recover-lr", "1e-3", "--output", str(tmp_path / "o")]) == 0
    recovery = json.loads((tmp_path / "o" / "result.json").read_text())["recovery"]
    assert recovery["mode"] == "lora" and recovery["lr"] == 1e-3 and list(recovery["ppl_at"]) == ["1"]
    assert recovery["lora"]["targets"] == ["self_attn.q_proj", "self_attn.v_proj"]
    (tmp_path / "bad.yaml").write_text("model: random:tiny-llama\nrecover: {stepz: 2}\n")
    assert main(["prune", "--config", str(tmp_path / "bad.yaml")]) == 2


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


BAD = [
    (["recover", "--pruned", "{tmp}/missing", "--steps", "2"], "no such directory"),
    (["recover", "--pruned", "{tmp}/plain", "--steps", "2"], "not a pruned model"),
    (["recover", "--pruned", "{model}", "--steps", "0"], "--steps must be a positive whole number"),
    (["recover", "--pruned", "{model}", "--steps", "-3"], "--steps must be a positive whole number"),
    (["recover", "--pruned", "{model}", "--distill", "--teacher", "random:opt-125m"], "same tokenizer"),
    (["recover", "--pruned", "{model}", "--mode", "lora", "--lora-targets", "c_attn"], "match no linear layer"),
    (["recover", "--pruned", "{model}", "--mode", "sparse"], "unknown --mode 'sparse'"),
    (["recover", "--pruned", "{model}", "--lr", "0"], "--lr must be a number in (0, 1)"),
    (["recover", "--pruned", "{model}", "--steps", "5", "--warmup", "5"], "--warmup 5 must be fewer"),
    (["recover", "--pruned", "{model}", "--schedule", "step"], "unknown --schedule"),
    (["recover", "--pruned", "{model}", "--distill", "--distill-alpha", "2"], "--distill-alpha must be a number in [0, 1]"),
    (["recover", "--pruned", "{model}", "--temperature", "2"], "add --distill"),
    (["recover", "--pruned", "{model}", "--lora-r", "4"], "apply to --mode lora"),
    (["recover", "--pruned", "{model}", "--lora-update", "dense"], "apply to --mode lora"),
    (["recover", "--pruned", "{model}", "--mode", "lora", "--lora-update", "sparse"], "unknown --lora-update 'sparse'"),
    (["recover", "--pruned", "{model}", "--train-data", "tokens:{tmp}/none.pt"], "no such file"),
    (["recover", "--pruned", "{model}", "--train-data", "tokens:{tmp}/toy.pt", "--eval-ppl", "tokens:{tmp}/toy.pt"],
     "never train on the evaluation text"),
    (["recover", "--pruned", "{model}", "--steps", "4", "--eval-at", "5"], "--eval-at takes steps from 1 to 4"),
    (["recover", "--pruned", "{model}", "--resume"], "--resume needs --checkpoint-dir"),
    (["recover", "--pruned", "{model}", "--checkpoint-every", "2"], "--checkpoint-every needs --checkpoint-dir"),
    (["recover", "--pruned", "{model}", "--save-model", "{model}"], "--save-model"),
    (["recover", "--steps", "2"], "--pruned"),
    (["prune", "--model", "random:tiny-llama", "--recover-steps", "0"], "--recover-steps must be a positive"),
    (["prune", "--model", "random:tiny-llama", "--recover-mode", "lora"], "add --recover-steps"),
    (["prune", "--model", "random:tiny-llama", "--pattern", "2:4", "--iterative", "3", "--recover-steps", "2"],
     "reaches an unstructured target in stages"),
    (["prune", "--model", "random:tiny-llama", "--recover-steps", "2", "--checkpoint-dir", "{tmp}/c"],
     "oneshot recover"),
    (["prune", "--model", "random:tiny-llama", "--method", "dense", "--recover-steps", "2"], "that prunes"),
    (["prune", "--model", "random:tiny-llama", "--recover-steps", "2", "--quantize", "int8"], "quantise"),
    (["prune", "--model", "random:tiny-llama", "--recover-steps", "2", "--iterative-schedule", "exp"],
     "unknown --iterative-schedule"),
]


@pytest.mark.parametrize("argv,fragment", BAD, ids=[" ".join(a[:1] + a[3:]) for a, _ in BAD])
def test_bad_input_is_refused_in_one_line_and_writes_nothing(argv, fragment, pruned_dir, tmp_path, capsys):
    model_dir, tokens = pruned_dir
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text('{"model_type": "llama"}')
    torch.save(toy_windows(4, 32), tmp_path / "toy.pt")
    before, model_before = _snapshot(tmp_path), _snapshot(model_dir)
    code = main([a.replace("{tmp}", str(tmp_path)).replace("{model}", str(model_dir)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("oneshot: error:"), err
    assert fragment in err[0], err[0]
    assert _snapshot(tmp_path) == before and _snapshot(model_dir) == model_before
