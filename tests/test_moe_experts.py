"""Mixtures of experts, structurally: whole routed experts removed (`--pattern experts`), whole blocks and
attention heads removed from MoE models, the saved models reloaded by plain transformers in a fresh
process, the criteria checked against a routed loop written out here, and composition with unstructured
pruning, quantisation and recovery.

Tiny random presets, a few calibration windows of 32 tokens: every run takes about a second.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from oneshot import RunSpec, run
from oneshot.cli import main
from oneshot.errors import UsageError
from oneshot.models import (TINY_MOE_PRESETS, decoder_blocks, expert_map, load_model, remove_blocks,
                            rewrite_config, structure_map)
from oneshot.spec import Recovery
from oneshot.structured import CRITERIA
from oneshot.structured import scores as S

from helpers import model_ids, model_logits, prune_keeping_models, tokens_spec

MOE = sorted(TINY_MOE_PRESETS)
EXPERT_CRITERIA = ("frequency", "reap", "router-logit")
STANDARD_ATTENTION = ("tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe")  # heads can go
COUNT_KEY = {"tiny-mixtral": "num_local_experts", "tiny-qwen2-moe": "num_experts",
             "tiny-qwen3-moe": "num_local_experts",  # transformers 5 stores it so; num_experts maps to it
             "tiny-olmoe": "num_experts", "tiny-deepseek-v2": "n_routed_experts", "tiny-deepseek-v3": "n_routed_experts"}
CALIBRATION = {}


@pytest.fixture(autouse=True, scope="module")
def _calibration(one_thread_tokens_calibration):
    CALIBRATION["source"] = one_thread_tokens_calibration


def _spec(model: str, method: str, pattern: str, sparsity: float | None, **changes) -> RunSpec:
    return tokens_spec(CALIBRATION["source"], model, method, pattern, sparsity, **changes)


def _prune(preset, method, pattern, sparsity, dtype=torch.float32, **changes):
    return prune_keeping_models(CALIBRATION["source"], preset, method, pattern, sparsity, dtype, **changes)


def _moe_blocks(model):
    """(index, the block's MoE module) for every block with routed experts, found without oneshot's maps."""
    return [(i, block.mlp) for i, block in enumerate(decoder_blocks(model))
            if hasattr(block.mlp, "experts") and hasattr(block.mlp, "gate")]


# ---- saved models reload in a process that never imports oneshot ------------------------------------

_RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    ids = torch.load(sys.argv[1])
    for directory in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            torch.save(model(input_ids=ids, use_cache=False).logits, directory + ".logits.pt")
    print(json.dumps({"oneshot_imported": any(m.split(".")[0] == "oneshot" for m in sys.modules)}))
""")

# (preset, pattern, criterion, sparsity) saved and reloaded: experts on every preset; blocks on every
# preset (DeepSeek's first block is dense: removing blocks rewrites first_k_dense_replace); heads where
# the attention is standard.
RELOADS = ([(p, "experts", "reap", 0.25) for p in MOE] + [(p, "layers", "block-influence", 0.34) for p in MOE]
           + [(p, "heads", "wanda", 0.1) for p in STANDARD_ATTENTION]
           + [("tiny-deepseek-v3", "experts", "frequency", 0.5), ("tiny-mixtral", "layers", "taylor", 0.5)])


@pytest.fixture(scope="module")
def reloads(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-structured")
    runs = {}
    for preset, pattern, method, sparsity in RELOADS:
        saved = root / f"{preset}-{pattern}-{method}"
        record, model, dense = _prune(preset, method, pattern, sparsity, save_model=str(saved),
                                      output=str(root / f"{saved.name}-out"))
        runs[preset, pattern, method] = {"record": record, "model": model, "dense": dense, "saved": saved,
                                         "logits": model_logits(model), "dense_logits": model_logits(dense)}
    torch.save(model_ids(), root / "ids.pt")
    done = subprocess.run([sys.executable, "-c", _RELOAD, str(root / "ids.pt"), *(str(r["saved"]) for r in
                                                                                   runs.values())],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"oneshot_imported": False}
    return runs


@pytest.mark.system  # reloads in a fresh Python process
@pytest.mark.parametrize("preset,pattern,method", [r[:3] for r in RELOADS])
def test_saved_moe_models_reload_with_the_logits_oneshot_had(reloads, preset, pattern, method):
    result = reloads[preset, pattern, method]
    record, saved = result["record"], result["saved"]
    reloaded = torch.load(str(saved) + ".logits.pt")
    assert reloaded.shape == result["logits"].shape
    assert torch.allclose(reloaded, result["logits"], atol=1e-5, rtol=0)
    assert not torch.allclose(result["logits"], result["dense_logits"], atol=1e-3)  # something was removed
    structure = json.loads((saved.parent / f"{saved.name}-out" / "result.json").read_text())["structure"]
    assert structure == json.loads(json.dumps(record.structure))
    config = json.loads((saved / "config.json").read_text())
    for key, (_old, new) in structure["config"].items():
        assert config[key] == new, key
    model = result["model"]
    assert structure["params_after"] == sum(p.numel() for p in model.parameters())
    assert structure["checkpoint_bytes"] == sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
    if pattern == "experts":
        kept = 8 - structure["removal"]["experts_per_block"]
        assert config[COUNT_KEY[preset]] == kept and structure["config"] == {COUNT_KEY[preset]: [8, kept]}
        for _index, moe in _moe_blocks(model):
            assert moe.experts.gate_up_proj.shape[0] == moe.experts.down_proj.shape[0] == kept
            assert moe.gate.weight.shape[0] == kept and moe.experts.num_experts == moe.gate.num_experts == kept
        assert record.sparsity_measured == structure["removed_expert_fraction"] == 1 - kept / 8
        # Active parameters per token: only the router rows went (top-k is unchanged).
        routers = sum(moe.gate.weight.shape[1] for _, moe in _moe_blocks(model)) * (8 - kept)
        assert structure["active_params_before"] - structure["active_params_after"] == routers
        assert structure["params_before"] - structure["params_after"] == \
            structure["routed_expert_params_before"] - structure["routed_expert_params_after"] + routers
    if pattern == "layers":
        assert config["num_hidden_layers"] == len(decoder_blocks(model)) < len(decoder_blocks(result["dense"]))
    if pattern == "heads":
        assert config["num_key_value_heads"] == 1 and config["num_attention_heads"] == 2


# ---- the criteria against a routed loop written out here ------------------------------------------

@torch.no_grad()
def _hand_scores(dense, pruned, ids):
    """Per MoE block, the three criteria computed here: the block's MoE input as the run saw it (the
    upstream blocks pruned; the block's own attention is untouched by expert removal), the dense block's
    router run on it, its top-k, and each expert's MLP run on exactly its tokens from the fused tensors."""
    seen = {}
    handles = [moe.register_forward_pre_hook(lambda _m, args, i=i: seen.setdefault(i, []).append(
        args[0].reshape(-1, args[0].shape[-1]))) for i, moe in _moe_blocks(pruned)]
    pruned(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    dense_moe = dict(_moe_blocks(dense))
    scores = {}
    for index, inputs in seen.items():
        x = torch.cat(inputs)
        moe = dense_moe[index]
        logits, weights, chosen = moe.gate(x)  # the block's own router: logits, top-k weights and indices
        experts = moe.experts
        reap, frequency = [], []
        for e in range(experts.num_experts):
            token, slot = torch.where(chosen == e)
            gate, up = (x[token] @ experts.gate_up_proj[e].t()).chunk(2, dim=-1)
            out = (experts.act_fn(gate) * up) @ experts.down_proj[e].t()
            frequency.append(float(len(token)))
            reap.append(float((weights[token, slot] * out.norm(dim=-1)).mean()) if len(token) else 0.0)
        scores[index] = {"frequency": torch.tensor(frequency, dtype=torch.float64),
                         "reap": torch.tensor(reap, dtype=torch.float64),
                         "router-logit": torch.softmax(logits.double(), dim=-1).mean(0)}
    return scores


def _lowest(scores: torch.Tensor, count: int, groups: int) -> list[int]:
    """The count lowest, count / groups from every group of consecutive experts; ties to the lower index."""
    size = len(scores) // groups
    removed = []
    for g in range(groups):
        part = scores[g * size:(g + 1) * size]
        order = sorted(range(size), key=lambda i: (float(part[i]), i))
        removed += [g * size + i for i in order[:count // groups]]
    return sorted(removed)


@pytest.mark.parametrize("criterion", EXPERT_CRITERIA)
@pytest.mark.parametrize("preset", MOE)
def test_expert_scores_match_a_hand_written_routed_loop_and_the_lowest_go(preset, criterion):
    record, model, dense = _prune(preset, criterion, "experts", 0.25, dtype=torch.float64)
    structure = record.structure
    ids = torch.load(CALIBRATION["source"][len("tokens:"):])
    hand = _hand_scores(dense, model, ids)
    groups = getattr(dense.config, "n_group", None) or 1 if preset == "tiny-deepseek-v3" else 1
    assert sorted(int(i) for i in structure["removed_experts"]) == sorted(hand)
    for index, by_criterion in hand.items():
        ours = torch.tensor(structure["expert_scores"][str(index)], dtype=torch.float64)
        torch.testing.assert_close(ours, by_criterion[criterion], rtol=1e-9, atol=1e-12)
        assert structure["expert_tokens"][str(index)] == by_criterion["frequency"].long().tolist()
        removed = _lowest(by_criterion[criterion], 2, groups)
        assert structure["removed_experts"][str(index)] == removed
        # The kept experts are exactly the others, their tensors and router rows bitwise as they were.
        kept = [e for e in range(8) if e not in removed]
        old, new = dict(_moe_blocks(dense))[index], dict(_moe_blocks(model))[index]
        assert torch.equal(new.experts.gate_up_proj, old.experts.gate_up_proj[kept])
        assert torch.equal(new.experts.down_proj, old.experts.down_proj[kept])
        assert torch.equal(new.gate.weight, old.gate.weight[kept])
        if hasattr(old.gate, "e_score_correction_bias"):
            assert torch.equal(new.gate.e_score_correction_bias, old.gate.e_score_correction_bias[kept])
    if preset == "tiny-deepseek-v3":  # group-limited routing: as many from each of the 2 groups
        for removed in structure["removed_experts"].values():
            assert sum(e < 4 for e in removed) == sum(e >= 4 for e in removed) == 1
    # Dense blocks and shared experts are untouched.
    for (name, before), after in zip(dense.named_parameters(), model.parameters()):
        if ".experts." not in name and not name.endswith("mlp.gate.weight"):
            assert torch.equal(before, after), name


def test_ties_go_to_the_lower_index_in_every_group():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 0.5])
    assert S.lowest_in_groups(scores, 2, [list(range(8))]) == [1, 2]
    assert S.lowest_in_groups(scores, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]) == [1, 7]
    assert S.lowest_in_groups(torch.zeros(8), 3, [list(range(8))]) == [0, 1, 2]
    assert S.reap(torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([4, 0])).tolist() == [0.5, 0.0]


def test_removing_no_expert_keeps_the_dense_model():
    record, model, dense = _prune("tiny-mixtral", "reap", "experts", 0.05)
    assert torch.equal(model_logits(model), model_logits(dense))
    assert record.structure["config"] == {} and record.sparsity_measured == 0.0
    assert record.structure["removed_experts"] == {}


def test_the_record_names_every_expert_layer_and_the_removed_ones_are_gone():
    record, model, _dense = _prune("tiny-olmoe", "frequency", "experts", 0.5)
    removed = record.structure["removed_experts"]
    assert set(removed) == {"0", "1"} and all(len(v) == 4 for v in removed.values())
    for index, experts in removed.items():
        for e in range(8):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                key = f"{index}.mlp.experts.{e}.{projection}"
                assert record.sparsity_per_layer[key] == (1.0 if e in experts else 0.0), key
    assert record.sparsity_per_layer["0.self_attn.q_proj"] == 0.0
    assert expert_map(model).num_experts == 4 and model.config.num_experts == 4


# ---- refused in one line, before any work, nothing written ----------------------------------------

@pytest.mark.parametrize("argv,fragment", [
    (["--model", "random:tiny-mixtral", "--sparsity", "0.85"],
     "would remove 7 of the 8 routed experts of every MoE block, and mixtral cannot route that way: 1 would be "
     "fewer than the 2 experts each token is routed to (num_experts_per_tok, which stays as it is); at most 0.75"),
    (["--model", "random:tiny-deepseek-v3", "--sparsity", "0.75"], "every group must keep at least 2; at most 0.5"),
    (["--model", "random:tiny-llama"], "model family 'llama' has no routed experts to remove"),
    (["--model", "random:tiny-mixtral", "--method", "wanda"], "for --pattern experts choose one of frequency, reap"),
    (["--model", "random:tiny-mixtral", "--method", "sparsegpt"], "zeroes weights"),
    (["--model", "random:tiny-mixtral", "--pattern", "heads"], "scores routed experts, not heads"),
    (["--model", "random:tiny-mixtral", "--pattern", "2:4"], "give --pattern experts"),
    (["--model", "random:tiny-mixtral", "--pattern", "channels", "--method", "wanda"],
     "mixtral: its MLP is a mixture of experts"),
    (["--model", "random:tiny-qwen2-moe", "--pattern", "width", "--method", "wanda"], "its MLP is a mixture"),
    (["--model", "random:tiny-deepseek-v3", "--pattern", "heads", "--method", "wanda"],
     "multi-head latent attention (MLA)"),
    (["--model", "random:tiny-olmoe", "--pattern", "heads", "--method", "wanda"], "q_norm and k_norm"),
    (["--model", "random:tiny-mixtral", "--quantize", "int8"], "not available with a structured --pattern"),
])
def test_bad_input_is_refused_in_one_line_before_any_work(argv, fragment, tmp_path, capsys):
    base = ["prune", "--method", "reap", "--pattern", "experts", "--sparsity", "0.25", "--nsamples", "2",
            "--seqlen", "32", "--eval-ppl", "none", "--quiet", "--output", str(tmp_path / "o"), "--save-model", str(tmp_path / "m")]
    code = main(base + argv)  # later flags win
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_criteria_are_declared_for_experts_only():
    for name in EXPERT_CRITERIA:
        assert CRITERIA[name].patterns == ("experts",) and CRITERIA[name].source
    assert all("experts" not in c.patterns for n, c in CRITERIA.items() if n not in EXPERT_CRITERIA)


# ---- blocks of mixtures of experts ------------------------------------------------------------------

@pytest.mark.parametrize("preset,key", [("tiny-deepseek-v3", "first_k_dense_replace"),
                                        ("tiny-qwen2-moe", "mlp_only_layers")])
def test_removed_blocks_keep_each_kept_blocks_kind_in_the_config(preset, key):
    """Removing DeepSeek's dense first block (or a Qwen MoE block among dense ones): the rewritten config
    builds the same kinds of blocks, and the model built from it holds the kept blocks' weights exactly."""
    from transformers import AutoModelForCausalLM

    model = load_model(f"random:{preset}").model
    if preset == "tiny-qwen2-moe":  # make block 0 dense through the config, as a real checkpoint would
        model.config.mlp_only_layers = [0]
        model = AutoModelForCausalLM.from_config(model.config).eval()
    kinds = [hasattr(block.mlp, "experts") for block in decoder_blocks(model)]
    kept = [1] + list(range(2, len(kinds))) if preset == "tiny-deepseek-v3" else [0]
    new_config = rewrite_config(model.config, kept_blocks=kept)
    expected = {"tiny-deepseek-v3": 0, "tiny-qwen2-moe": [0]}[preset]
    assert getattr(new_config, key) == expected
    remove_blocks(model, kept)
    rebuilt = AutoModelForCausalLM.from_config(model.config).eval()
    assert [hasattr(block.mlp, "experts") for block in decoder_blocks(rebuilt)] == [kinds[i] for i in kept]
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(model_logits(rebuilt), model_logits(model))


def test_the_structure_map_of_moe_families_says_what_can_go():
    for preset in MOE:
        model = load_model(f"random:{preset}").model
        smap = structure_map(model)
        assert not smap.channels.removable and "mixture of experts" in smap.channels.reason
        assert smap.heads.removable == (preset in STANDARD_ATTENTION), preset


# ---- composition: experts, then unstructured pruning, quantisation and recovery --------------------

def test_experts_then_wanda_then_int8_then_recovery_keep_their_properties(tmp_path):
    from transformers import AutoModelForCausalLM

    experts_dir, wanda_dir, int8_dir, recovered_dir = (str(tmp_path / n) for n in ("experts", "wanda", "int8", "rec"))
    run(_spec("random:tiny-qwen2-moe", "reap", "experts", 0.25, save_model=experts_dir))
    wanda = run(_spec(experts_dir, "wanda", "unstructured", 0.5, save_model=wanda_dir))
    model = AutoModelForCausalLM.from_pretrained(wanda_dir)
    assert model.config.num_experts == 6 and wanda.sparsity_measured == 0.5
    for _index, moe in _moe_blocks(model):  # Wanda: floor(cols / 2) zeros in every row of every kept expert
        for fused in (moe.experts.gate_up_proj, moe.experts.down_proj):
            assert bool(((fused == 0).sum(-1) == fused.shape[-1] // 2).all())
    zeros = {n: p == 0 for n, p in model.named_parameters() if p.dim() >= 2}  # pruned weights (not biases)

    int8 = run(_spec(wanda_dir, "dense", "unstructured", None, quantize="int8", save_model=int8_dir))
    assert int8.quantization["bits"] == 8
    quantised = AutoModelForCausalLM.from_pretrained(int8_dir)
    assert quantised.config.num_experts == 6
    for name, p in quantised.named_parameters():
        assert name not in zeros or bool((p[zeros[name]] == 0).all()), name  # every zero kept
        if ".experts." in name:  # one grid per output row: at most 256 levels (zero among them)
            rows = p.reshape(-1, p.shape[-1])
            assert max(len(torch.unique(row)) for row in rows) <= 256
    with pytest.raises(UsageError, match="is quantised"):  # training would move it off the grid: recover first
        run(_spec(int8_dir, "dense", "unstructured", None, kind="recover", recover=Recovery(steps=2),
                  save_model=str(tmp_path / "refused")))

    recovered = run(_spec(wanda_dir, "dense", "unstructured", None, kind="recover", save_model=recovered_dir,
                          recover=Recovery(steps=2, batch_size=2, seqlen=32)))
    assert recovered.recovery.masks_locked and recovered.recovery.steps == 2
    trained = AutoModelForCausalLM.from_pretrained(recovered_dir)
    assert trained.config.num_experts == 6
    changed = False
    for (name, p), before in zip(trained.named_parameters(), model.parameters()):
        assert name not in zeros or bool((p[zeros[name]] == 0).all()), name
        changed |= not torch.equal(p, before)
    assert changed
    assert recovered.pattern == "unstructured" and recovered.method == "wanda"  # from the card of what it trained
