"""The newest commands as trustworthy as `prune` (issue 25): recovery, quantised inputs, resume, lineage, MoE,
structured patterns, allocation and option handling. One table of bad input (each case: a non-zero exit, one
line on stderr naming what to change, no traceback, nothing written and nothing that existed changed), then one
test per class of problem found: silent no-training, late failures, identity by string, lost properties,
silent no-ops and misleading messages."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from oneshot import Calibration, Evaluation, RunSpec, run
from oneshot.cli import main
from oneshot.spec import Recovery

from helpers import random_ids, tiny_args

ARGS = tiny_args(nsamples=2, seqlen=32, eval_samples=1)
RECOVER = ["--steps", "2", "--batch-size", "2", "--train-seqlen", "32", "--seqlen", "32", "--eval-samples", "1",
           "--quiet"]
SPEC = RunSpec(model="random:tiny-llama", method="wanda", sparsity=0.5, calibration=Calibration(nsamples=2, seqlen=32),
               eval=Evaluation(samples=1), progress=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved models the cases read (none may change): pruned tiny Llamas (two seeds), an int8 one, a GGUF one,
    a pruned tiny Mixtral, a model without a card, token files, and a recovery checkpoint of model "a"."""
    root = tmp_path_factory.mktemp("saved")
    run(SPEC.replace(save_model=str(root / "a")))
    run(SPEC.replace(seed=5, save_model=str(root / "b")))
    run(SPEC.replace(quantize="int8", save_model=str(root / "quant")))
    run(SPEC.replace(quantize="int8", symmetric=True, group_size=32, format="gguf", save_model=str(root / "gguf")))
    run(SPEC.replace(model="random:tiny-mixtral", save_model=str(root / "moe")))
    shutil.copytree(root / "a", root / "plain")
    (root / "plain" / "oneshot.json").unlink()
    torch.save(random_ids(8, 32, seed=1), root / "toks.pt")
    torch.save(torch.cat([random_ids(2, 32, seed=1), random_ids(2, 32, seed=9)]), root / "overlap.pt")
    (root / "text.txt").write_text("Plenty of words to train on and to evaluate. " * 200)
    assert main(["recover", "--pruned", str(root / "a"), "--steps", "4", "--batch-size", "2", "--train-seqlen", "32",
                 "--seqlen", "32", "--eval-samples", "1", "--quiet", "--checkpoint-dir", str(root / "ck_a"),
                 "--checkpoint-every", "2"]) == 0
    (root / "sym.yaml").write_text("model: random:tiny-llama\nquantize: int8\nsymmetric: \"false\"\n")
    (root / "nosteps.yaml").write_text("model: random:tiny-llama\nrecover: {mode: lora}\n")
    (root / "zerosteps.yaml").write_text("model: random:tiny-llama\nrecover: {steps: 0}\n")
    sweep = ("models: [random:tiny-llama]\nmethods: [magnitude]\nsparsities: [0.5]\n"
             "calibration: {nsamples: 2, seqlen: 32}\neval: {ppl: [wiki-offline], samples: 1}\n")
    (root / "seq_sweep.yaml").write_text(sweep + "sequential: true\n")
    (root / "steps_sweep.yaml").write_text(sweep.replace("[magnitude]", "[wanda]") + "recover: {steps: [0, 2]}\n")
    return root


P = "{saved}"
CASES = [
    # recover: its own values
    (["recover", "--pruned", f"{P}/a", "--steps", "0"], "--steps must be a positive whole number"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--lr", "1.5"], "--lr must be a number in (0, 1)"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--schedule", "sawtooth"], "unknown --schedule"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--mode", "qlora"], "unknown --mode"),
    (["recover", "--pruned", f"{P}/a", "--steps", "5", "--warmup", "5"], "fewer than the 5 steps"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--temperature", "2"], "apply to distillation"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--lora-r", "4"], "apply to --mode lora"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--iterative", "2"], "unrecognized arguments"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--eval-at", "x"], "takes whole numbers"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--eval-at", "9"], "takes steps from 1 to 2"),
    # recover: silent no-ops
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--checkpoint-every", "1"], "needs --checkpoint-dir"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--checkpoint-dir", "{tmp}/ck", "--checkpoint-every", "10"],
     "would never write a checkpoint"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--train-data", f"tokens:{P}/toks.pt"], "used as they are"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--eval-at", "1", "--eval-ppl", "none", "--output", "{tmp}/o"],
     "names no source"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--eval-ppl", "none"], "this recovery would keep nothing"),
    # recover: identity by file, not by spelling
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--train-data", "file:./text.txt", "--eval-ppl", "file:text.txt"],
     "are the same file"),
    (["recover", "--pruned", f"{P}/a", "--steps", "2", "--batch-size", "2", "--seqlen", "32", "--quiet",
      "--train-data", f"tokens:{P}/toks.pt", "--eval-ppl", f"tokens:{P}/overlap.pt"], "share 2 token window(s)"),
    (["recover", "--pruned", f"{P}/b", *RECOVER[2:], "--steps", "4", "--checkpoint-dir", f"{P}/ck_a",
      "--checkpoint-every", "2", "--resume"], "holds the checkpoint of another run (model differ)"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--resume"], "needs --checkpoint-dir"),
    # recover: its input
    (["recover", "--pruned", "{tmp}/nothing", *RECOVER], "no such directory"),
    (["recover", "--pruned", f"{P}/plain", *RECOVER], "not a pruned model saved by oneshot"),
    (["recover", "--pruned", f"{P}/gguf", *RECOVER], "no config.json"),
    (["recover", "--pruned", f"{P}/quant", *RECOVER], "is quantised"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--save-model", f"{P}/a", "--overwrite"], "which this run reads"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--save-model", f"{P}/b"], "already exists"),
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--distill", "--teacher", "random:nope"], "unknown preset"),
    # recover: LoRA targets, before any work
    (["recover", "--pruned", f"{P}/a", *RECOVER, "--mode", "lora", "--lora-targets", "nope"], "match no linear layer"),
    (["recover", "--pruned", f"{P}/moe", *RECOVER, "--mode", "lora", "--lora-targets", "mlp.experts.0.gate_proj"],
     "LoRA (peft) cannot adapt"),
    # prune with recovery
    (["prune", *ARGS, "--iterative", "3"], "--iterative applies to recover; add --recover-steps N"),
    (["prune", *ARGS, "--recover-mode", "lora"], "add --recover-steps N"),
    (["prune", *ARGS, "--method", "dense", "--recover-steps", "2"], "choose a --method that prunes"),
    (["prune", *ARGS, "--recover-steps", "2", "--pattern", "2:4", "--iterative", "2"], "fixes its sparsity"),
    (["prune", *ARGS, "--recover-steps", "2", "--quantize", "int8"], "recovery would move the weights off"),
    (["prune", *ARGS, "--recover-steps", "2", "--checkpoint-dir", "{tmp}/ck"], "is not supported"),
    (["prune", *ARGS, "--recover-steps", "2", "--recover-eval-at", "5"], "takes steps from 1 to 2"),
    (["prune", *ARGS, "--recover-steps", "2", "--weights-on-disk"], "recovery trains the whole model"),
    # calibration order, options, allocation
    (["prune", *ARGS, "--method", "magnitude", "--sequential"], "magnitude reads no calibration data"),
    (["prune", *ARGS, "--method", "flap", "--pattern", "channels", "--sparsity", "0.2", "--sequential"],
     "a structured pattern scores whole units"),
    (["prune", *ARGS, "--option", "percdamp=0.1", "--option", "percdamp=0.2"], "--option percdamp is given twice"),
    (["prune", *ARGS, "--option", "owl_m=3"], "owl_m is an option of --allocation owl"),
    (["prune", *ARGS, "--allocation", "owl", "--pattern", "2:4"], "gives layers different sparsities"),
    (["prune", *ARGS, "--method", "admm", "--option", "iterations=-1"], "iterations=-1 is not valid"),
    (["prune", *ARGS, "--method", "admm", "--option", "rho=-1"], "rho"),
    # structured patterns
    (["prune", *ARGS[2:], "--model", "random:tiny-gemma3-1kv", "--pattern", "width", "--method", "magnitude",
      "--sparsity", "0.2"], "share one key/value head (one KV group)"),
    (["prune", *ARGS, "--pattern", "heads", "--method", "sparsegpt", "--sparsity", "0.2"], "cannot choose units"),
    (["prune", *ARGS, "--pattern", "layers", "--method", "flap", "--sparsity", "0.2"], "scores heads and channels"),
    (["prune", *ARGS, "--pattern", "channels", "--method", "magnitude", "--allocation", "owl", "--sparsity", "0.2"],
     "use uniform"),
    # quantisation and formats
    (["prune", *ARGS, "--symmetric"], "applies to quantisation; add --quantize"),
    (["prune", *ARGS, "--quantize", "int8", "--weights-on-disk"], "the writers take the whole model"),
    (["eval", "--model", f"{P}/gguf", "--quiet"], "holds a GGUF model: give the file itself"),
    (["eval", "--pruned", f"{P}/gguf", "--quiet"], "holds a GGUF model: give the file itself"),
    # configs
    (["prune", "--config", f"{P}/sym.yaml"], "symmetric must be true or false (got the text 'false'"),
    (["prune", "--config", f"{P}/nosteps.yaml"], "recover.mode applies to recover; add recover.steps N"),
    (["prune", "--config", f"{P}/zerosteps.yaml"], "recover.steps must be a positive whole number"),
    (["sweep", f"{P}/seq_sweep.yaml"], "sequential changes the order"),
    (["sweep", f"{P}/steps_sweep.yaml"], "recover.steps must be a positive whole number"),
    # eval
    (["eval", "--model", "random:tiny-llama", "--seqlen", "32", "--eval-samples", "1", "--eval-bos", "--quiet"],
     "has no beginning-of-text token"),
    (["eval", "--model", "random:tiny-llama", "--seqlen", "32", "--output", f"{P}/a"], "or pass --overwrite"),
]


def _snapshot(*roots: Path) -> dict:
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            found[str(path)] = (digest, path.stat().st_mode)
    return found


def test_the_table_grows_by_at_least_40_cases_over_the_newest_commands():
    assert len(CASES) >= 40 and {argv[0] for argv, _ in CASES} == {"prune", "recover", "eval", "sweep"}


@pytest.mark.parametrize("argv,fragment", CASES, ids=[" ".join(a[:1] + [w for w in a[1:] if w not in ARGS + RECOVER])
                                                      for a, _ in CASES])
def test_bad_input_to_the_newest_commands_is_one_line_and_changes_nothing(argv, fragment, saved, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.chdir(saved)  # relative spellings (./text.txt) resolve here
    before = _snapshot(saved, tmp_path)
    code = main([a.replace("{saved}", str(saved)).replace("{tmp}", str(tmp_path)) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("oneshot: error:")]
    assert code == 2, captured.err
    assert len(errors) == 1 and lines[-1] == errors[0], captured.err
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert _snapshot(saved, tmp_path) == before


# ---- one test per class of problem ---------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_silent_no_training_full_recovery_trains_every_pruned_expert_tensor(preset, tmp_path):
    """Every fused expert tensor that was pruned changes in its kept weights and in none of its pruned ones."""
    from safetensors.torch import load_file

    pruned = tmp_path / "pruned"
    run(SPEC.replace(model=f"random:{preset}", save_model=str(pruned)))
    record = run(RunSpec(kind="recover", method="dense", model=str(pruned), save_model=str(tmp_path / "rec"),
                         recover=Recovery(steps=3, batch_size=2, seqlen=32, lr=1e-2), calibration=Calibration(seqlen=32),
                         eval=Evaluation(samples=1), progress=False))
    before, after = load_file(str(pruned / "model.safetensors")), load_file(str(tmp_path / "rec" / "model.safetensors"))
    experts = [name for name in before if ".experts." in name and not name.endswith("_bias")]
    assert experts
    changed = 0
    for name in experts:
        keep = before[name] != 0
        assert 0 < keep.float().mean() < 1, name  # it was pruned
        assert torch.equal(after[name] == 0, ~keep), name  # its pruned weights stayed exactly zero
        assert not torch.equal(after[name][keep], before[name][keep]), name  # and its kept ones trained
        changed += 1
    assert changed == len(experts)
    kinds = record.recovery.trained["kinds"]
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(kinds)
    assert kinds["mlp.experts.down_proj"]["tensors"] == 2  # one per block


def test_tracebacks_and_late_failures_are_found_before_any_work(saved, capsys, monkeypatch):
    """A missing optional package and a LoRA target peft cannot adapt: refused before the model loads."""
    import importlib.util

    from oneshot.models import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    loads = []
    monkeypatch.setattr(loading, "_load_model", lambda *a, **k: loads.append(a))
    code = main(["recover", "--pruned", str(saved / "a"), *RECOVER, "--mode", "lora", "--output", "/tmp/unused-x"])
    err = capsys.readouterr().err
    assert code == 2 and "needs the peft package: pip install 'oneshot[recover]'" in err and not loads


def test_identity_by_file_lineage_names_the_base_by_path_and_fingerprint(tmp_path, monkeypatch):
    """A saved model's card names its base by resolved path and fingerprint: distillation finds it from
    another directory, a second stage keeps the original base, and a changed base is refused."""
    base = tmp_path / "base"  # a plain checkpoint (no oneshot card): it is its own base
    run(SPEC.replace(method="dense", save_model=str(base)))
    (base / "oneshot.json").unlink()
    monkeypatch.chdir(tmp_path)
    run(SPEC.replace(model="base", save_model=str(tmp_path / "pruned")))  # a relative spelling
    first = json.loads((tmp_path / "pruned" / "oneshot.json").read_text())["base"]
    assert first["path"] == str(base.resolve()) and first["kind"] == "local" and len(first["fingerprint"]) == 16
    run(SPEC.replace(model=str(tmp_path / "pruned"), method="magnitude", sparsity=0.6,
                     save_model=str(tmp_path / "second")))
    assert json.loads((tmp_path / "second" / "oneshot.json").read_text())["base"] == first  # the original base
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the base's spelling "base" means nothing here; its path still does
    record = run(RunSpec(kind="recover", method="dense", model=str(tmp_path / "pruned"), output=str(tmp_path / "o"),
                         recover=Recovery(steps=1, batch_size=2, seqlen=32, distill=True),
                         calibration=Calibration(seqlen=32), eval=Evaluation(samples=1), progress=False))
    assert record.recovery.distill["teacher"] == str(base.resolve())
    (base / "config.json").write_text((base / "config.json").read_text().replace("}", ' , "x": 1}', 1)[:-1] + "}\n")
    with pytest.raises(Exception, match="holds different weights now"):
        run(RunSpec(kind="recover", method="dense", model=str(tmp_path / "pruned"), output=str(tmp_path / "o2"),
                    recover=Recovery(steps=1, batch_size=2, seqlen=32, distill=True),
                    calibration=Calibration(seqlen=32), eval=Evaluation(samples=1), progress=False))


def test_lost_properties_structured_models_keep_their_removed_fraction(tmp_path):
    pruned = tmp_path / "channels"
    first = run(SPEC.replace(method="magnitude", pattern="channels", sparsity=0.2, save_model=str(pruned)))
    again = run(RunSpec(kind="eval", method="dense", model=str(pruned), calibration=Calibration(seqlen=32),
                        eval=Evaluation(samples=1), progress=False))
    recovered = run(RunSpec(kind="recover", method="dense", model=str(pruned), output=str(tmp_path / "o"),
                            recover=Recovery(steps=1, batch_size=2, seqlen=32), calibration=Calibration(seqlen=32),
                            eval=Evaluation(samples=1), progress=False))
    assert first.sparsity_measured > 0.15
    assert again.sparsity_measured == recovered.sparsity_measured == first.sparsity_measured
    assert again.structure == recovered.structure == json.loads(json.dumps(
        {k: v for k, v in first.structure.items() if k != "checkpoint_bytes"}))


def test_silent_no_ops_are_refused_where_the_setting_would_change_nothing():
    from oneshot.errors import UsageError
    from oneshot.plan import check_fields

    for spec, words in ((SPEC.replace(method="magnitude", sequential=True), "reads no calibration data"),
                        (SPEC.replace(kind="recover", method="dense", recover=Recovery(steps=4, checkpoint_every=8)),
                         "needs checkpoint_dir")):
        with pytest.raises(UsageError, match=words):
            check_fields(spec)


def test_misleading_messages_name_the_setting_the_way_the_caller_spelled_it(saved):
    """The same bad value named as a flag, a config key or a Python attribute path."""
    from oneshot.errors import UsageError
    from oneshot.settings import Spelling

    bad = RunSpec(kind="recover", method="dense", model=str(saved / "a"), recover=Recovery(steps=2, warmup=2))
    for spelling, name in ((Spelling("flag", "recover"), "--warmup"), (Spelling("flag", "prune"), "--recover-warmup"),
                           (Spelling("key"), "recover.warmup")):
        with pytest.raises(UsageError, match=f"^{name} 2 must be fewer than the 2 steps"):
            run(bad, spelling=spelling)


def test_silent_no_ops_a_sweep_names_the_pairs_it_leaves_out(tmp_path, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text("models: [random:tiny-llama]\nmethods: [magnitude, flap]\npatterns: [unstructured, channels]\n"
                      "sparsities: [0.2]\nallocations: [uniform, owl]\ncalibration: {nsamples: 2, seqlen: 32}\n"
                      "eval: {ppl: [wiki-offline], samples: 1}\n")
    assert main(["sweep", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "note: left out flap x unstructured:" in out
    assert "note: left out magnitude x channels x owl: a structured pattern removes the same units" in out
