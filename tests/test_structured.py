"""Structured pruning: every pattern on every tiny family through the run API, saved models reloaded by
plain transformers in a fresh process, exact bookkeeping of what was removed, the refit and gradient
maths checked against independent computations, and bad input refused before any work.

Tiny random models, a few calibration windows of 32 tokens: every test runs in seconds.
"""
import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from oneshot import RunSpec, run
from oneshot.cli import main
from oneshot.errors import UsageError
from oneshot.methods import parse_pattern
from oneshot.models import (COLS, ROWS, TINY_PRESETS, ByteTokenizer, LoadedModel, decoder_blocks, get_weight,
                            load_model, prunable_layers, structure_map)
from oneshot.spec import Calibration, Evaluation
from oneshot.structured import CRITERIA, Sizes, plan_removal
from oneshot.structured import scores as S
from oneshot.structured.passes import first_order, hidden_states
from oneshot.structured.refit import compensation, least_squares

from helpers import model_ids, model_logits, prune_keeping_models, tokens_spec

PRESETS = list(TINY_PRESETS)
FIXED_HEADS = ("tiny-opt", "tiny-gpt2", "tiny-gpt-neox")  # head_dim derives from hidden_size: heads stay
ONE_KV_GROUP = {"tiny-gemma3-1kv"}  # every query head shares the one key/value head
PATTERNS = ("layers", "heads", "channels", "width")
# One criterion per pattern for the family sweep (every criterion runs on tiny-llama below); heads
# also refit by least squares, so the refit runs on every family's o_proj layout.
E2E = {"layers": ("block-influence", {}, 0.5), "heads": ("wanda", {"reconstruct": True}, 0.15),
       "channels": ("taylor", {}, 0.3), "width": ("gradient", {}, 0.3)}


CALIBRATION = {}  # the tokens: file every run here calibrates on (sampling text would cost more than pruning)


@pytest.fixture(autouse=True, scope="module")
def _calibration(one_thread_tokens_calibration):
    CALIBRATION["source"] = one_thread_tokens_calibration


def _spec(preset: str, method: str, pattern: str, sparsity: float, **changes) -> RunSpec:
    return tokens_spec(CALIBRATION["source"], f"random:{preset}", method, pattern, sparsity, **changes)


def _prune(preset, method, pattern, sparsity, dtype=torch.float32, **changes):
    return prune_keeping_models(CALIBRATION["source"], preset, method, pattern, sparsity, dtype, **changes)


# ---- every pattern on every family, reloaded by plain transformers -------------------------------

_RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    ids = torch.load(sys.argv[1])
    found = {}
    for directory in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            torch.save(model(input_ids=ids, use_cache=False).logits, directory + ".logits.pt")
    print(json.dumps({"oneshot_imported": any(m.split(".")[0] == "oneshot" for m in sys.modules)}))
""")


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    """Every pattern on every family through run(); then one fresh process (that never imports oneshot)
    reloads every saved model with from_pretrained and writes its logits."""
    root = tmp_path_factory.mktemp("structured")
    runs = {}
    for preset in PRESETS:
        for pattern in PATTERNS:
            method, options, sparsity = E2E[pattern]
            saved = root / f"{preset}-{pattern}"
            try:
                record, model, dense = _prune(preset, method, pattern, sparsity, options=options, save_model=str(saved),
                                              output=str(root / f"{preset}-{pattern}-out"))
            except UsageError as exc:
                runs[preset, pattern] = {"refused": str(exc), "saved": saved}
                continue
            runs[preset, pattern] = {"record": record, "logits": model_logits(model), "dense": model_logits(dense),
                                     "saved": saved, "model": model}
    torch.save(model_ids(), root / "ids.pt")
    dirs = [str(r["saved"]) for r in runs.values() if "record" in r]
    done = subprocess.run([sys.executable, "-c", _RELOAD, str(root / "ids.pt"), *dirs], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"oneshot_imported": False}
    return runs


@pytest.mark.system  # reloads in a fresh Python process
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_pattern_on_every_family_reloads_with_the_same_logits(family_runs, preset, pattern):
    result = family_runs[preset, pattern]
    if preset in FIXED_HEADS and pattern in ("heads", "width"):
        message = result["refused"]
        assert "\n" not in message and "head_dim is hidden_size / num_heads" in message
        assert not result["saved"].exists()
        return
    if preset in ONE_KV_GROUP and pattern in ("heads", "width"):  # Gemma 3 270M's shape: the reason is named
        message = result["refused"]
        assert "\n" not in message and "share one key/value head (one KV group)" in message
        assert not message.rstrip().endswith(":") and not result["saved"].exists()
        return
    record, saved = result["record"], result["saved"]
    reloaded = torch.load(str(saved) + ".logits.pt")
    assert reloaded.shape == result["logits"].shape
    assert torch.allclose(reloaded, result["logits"], atol=1e-5, rtol=0)
    assert not torch.allclose(result["logits"], result["dense"], atol=1e-3)  # something was removed
    # result.json: parameters before and after, the removed fraction, the checkpoint's size
    structure = json.loads((saved.parent / f"{preset}-{pattern}-out" / "result.json").read_text())["structure"]
    assert structure == json.loads(json.dumps(record.structure))
    model = result["model"]
    assert structure["params_after"] == sum(p.numel() for p in model.parameters())
    assert structure["block_params_after"] == sum(p.numel() for p in decoder_blocks(model).parameters())
    assert structure["removed_fraction"] == pytest.approx(
        1 - structure["block_params_after"] / structure["block_params_before"])
    assert 0 < structure["removed_fraction"] < 1 and record.sparsity_measured == structure["removed_fraction"]
    assert structure["checkpoint_bytes"] == sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
    config = json.loads((saved / "config.json").read_text())
    for key, (_old, new) in structure["config"].items():
        assert config[key] == new, key
    lineage = json.loads((saved / "oneshot.json").read_text())
    assert lineage["pattern"] == pattern and lineage["structure"]["removed_fraction"] == structure["removed_fraction"]


# ---- every criterion on every pattern it scores ----------------------------------------------------

_PAIRS = [(name, pattern) for name, criterion in CRITERIA.items() for pattern in criterion.patterns
          if pattern != "experts"]  # routed experts need a mixture of experts: tests/test_moe_experts.py


@pytest.mark.parametrize("method,pattern", _PAIRS)
def test_every_criterion_removes_what_the_budget_says(method, pattern):
    record, model, _dense = _prune("tiny-llama", method, pattern, 0.5 if pattern == "layers" else 0.2)
    smap = structure_map(model)
    structure = record.structure
    removal = structure["removal"]
    assert smap.num_blocks == 2 - removal["blocks"]
    assert smap.heads.num_units == 2 - removal["kv_groups_per_block"]
    assert smap.channels.num_units == 128 - removal["channels_per_block"]
    assert {"layers": removal["blocks"] > 0, "heads": removal["kv_groups_per_block"] > 0,
            "channels": removal["channels_per_block"] > 0}[pattern if pattern != "width" else "channels"]
    assert torch.isfinite(model_logits(model)).all()
    if pattern == "layers":
        assert len(structure["removed_blocks"]) == removal["blocks"] and len(structure["block_scores"]) >= 1


@pytest.mark.parametrize("method", ["magnitude", "wanda", "flap", "taylor", "gradient"])
def test_reconstruct_refits_and_changes_only_the_consuming_projections(method):
    plain, model_plain, _ = _prune("tiny-llama", method, "width", 0.3)
    refit, model_refit, _ = _prune("tiny-llama", method, "width", 0.3, options={"reconstruct": True})
    assert refit.options == {"reconstruct": True} and refit.calibration is not None
    # Block 0 reads the same inputs either way (later blocks see the refit upstream under Wanda-sp).
    assert plain.structure["removed_kv_groups"]["0"] == refit.structure["removed_kv_groups"]["0"]
    block_p, block_r = decoder_blocks(model_plain)[0], decoder_blocks(model_refit)[0]
    for name, layer in prunable_layers(block_p).items():
        same = torch.equal(get_weight(layer), get_weight(prunable_layers(block_r)[name]))
        assert same == (name not in ("self_attn.o_proj", "mlp.down_proj")), name


# ---- removing nothing -------------------------------------------------------------------------------

@pytest.mark.parametrize("method,pattern,options", [
    ("block-influence", "layers", {}), ("angular", "layers", {}), ("magnitude", "heads", {"reconstruct": True}),
    ("flap", "channels", {}), ("taylor", "width", {}), ("wanda", "width", {"reconstruct": True}),
])
def test_removing_nothing_gives_the_dense_logits(method, pattern, options):
    record, model, dense = _prune("tiny-llama", method, pattern, 0.0, options=options)
    assert torch.equal(model_logits(model), model_logits(dense))
    assert record.structure["config"] == {} and record.sparsity_measured == 0.0
    assert record.structure["params_after"] == record.structure["params_before"]


# ---- bookkeeping: the removed rows and columns are the lowest-scored units -----------------------

def _kept_units(coupling, before, after, layer):
    """Which units of `before` survive in `after`, found by matching the consuming layer's columns."""
    columns = coupling.index(layer, COLS, range(coupling.num_units)).reshape(coupling.num_units, -1)
    old, new = get_weight(before), get_weight(after)
    kept = []
    for unit in range(coupling.num_units):
        block = old[:, columns[unit]]
        if any(torch.equal(block, new[:, j:j + block.shape[1]]) for j in range(0, new.shape[1], block.shape[1])):
            kept.append(unit)
    return kept


@pytest.mark.parametrize("pattern", ["heads", "channels"])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-phi3", "tiny-gpt2"])
def test_removed_units_are_the_lowest_scored_and_every_member_follows(preset, pattern):
    if preset == "tiny-gpt2" and pattern == "heads":
        pytest.skip("GPT-2 cannot lose heads (refusal tested above)")
    record, model, dense = _prune(preset, "magnitude", pattern, 0.15)
    kind = pattern
    before, after = structure_map(dense), structure_map(model)
    coupling = before.coupling(kind)
    consumer = next(m for m in coupling.members if m.axis == COLS)
    for block_old, block_new in zip(decoder_blocks(dense), decoder_blocks(model)):
        old, new = prunable_layers(block_old), prunable_layers(block_new)
        # Magnitude-sp, written out: L2 norm of each input column of the consuming projection, per unit.
        norms = get_weight(old[consumer.layer]).double().norm(dim=0)
        scores = torch.stack([norms[consumer.indices[u]].sum() for u in range(coupling.num_units)])
        count = coupling.num_units - after.coupling(kind).num_units
        lowest = sorted(torch.argsort(scores)[:count].tolist())
        kept = [u for u in range(coupling.num_units) if u not in lowest]
        # Every member layer holds exactly the kept units' rows and columns, in order, biases included.
        for (layer, axis), _members in coupling.layers().items():
            index = coupling.index(layer, axis, kept)
            expected = get_weight(old[layer]).index_select(axis, index)
            assert torch.equal(get_weight(new[layer]), expected), layer
            if axis == ROWS and old[layer].bias is not None:
                assert torch.equal(new[layer].bias, old[layer].bias[index]), layer
        assert _kept_units(coupling, old[consumer.layer], new[consumer.layer], consumer.layer) == kept


@torch.no_grad()
def _consumer_inputs(model, block_index: int, layer_name: str, ids: torch.Tensor) -> torch.Tensor:
    seen = []
    layer = prunable_layers(decoder_blocks(model)[block_index])[layer_name]
    handle = layer.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].reshape(-1, inputs[0].shape[-1])))
    model(input_ids=ids, use_cache=False)
    handle.remove()
    return torch.cat(seen).double()


def _calibration_ids() -> torch.Tensor:
    """The windows every run above calibrates on."""
    return torch.load(CALIBRATION["source"][len("tokens:"):])


@pytest.mark.parametrize("kind", ["heads", "channels"])
@pytest.mark.parametrize("method", ["wanda", "flap"])
def test_activation_scores_of_the_first_block_follow_the_papers_formulas(method, kind):
    _record, model, dense = _prune("tiny-llama", method, kind, 0.2, dtype=torch.float64,
                                   options={"bias_compensation": False} if method == "flap" else {})
    coupling = structure_map(dense).coupling(kind)
    consumer = next(m for m in coupling.members if m.axis == COLS)
    x = _consumer_inputs(dense, 0, consumer.layer, _calibration_ids())  # block 0 sees the dense inputs
    weight = get_weight(prunable_layers(decoder_blocks(dense)[0])[consumer.layer]).double()
    if method == "wanda":  # Wanda-sp: mean over rows of |W_ij| * ||X_j||, summed over the unit's columns
        per_column = (weight.abs() * x.pow(2).sum(0).div(4).sqrt()).mean(0)
    else:  # FLAP: sample variance over tokens times the squared column norm; a unit adds up their squares
        per_column = (x.var(dim=0, unbiased=True) * weight.pow(2).sum(0)).pow(2)
    scores = torch.stack([per_column[consumer.indices[u]].sum() for u in range(coupling.num_units)])
    removed = coupling.num_units - structure_map(model).coupling(kind).num_units
    kept = sorted(torch.argsort(scores)[removed:].tolist())
    new = prunable_layers(decoder_blocks(model)[0])[consumer.layer]
    assert _kept_units(coupling, prunable_layers(decoder_blocks(dense)[0])[consumer.layer], new,
                       consumer.layer) == kept


def test_flap_bias_compensation_adds_the_mean_of_the_removed_inputs():
    record, model, dense = _prune("tiny-llama", "flap", "channels", 0.3, dtype=torch.float64)
    assert record.structure["config"]["mlp_bias"] == [False, True]
    smap = structure_map(dense)
    removed_count = 128 - structure_map(model).channels.num_units
    old = prunable_layers(decoder_blocks(dense)[0])["mlp.down_proj"]
    new = prunable_layers(decoder_blocks(model)[0])["mlp.down_proj"]
    kept = _kept_units(smap.channels, old, new, "mlp.down_proj")
    removed = [c for c in range(128) if c not in kept]
    assert len(removed) == removed_count
    x = _consumer_inputs(dense, 0, "mlp.down_proj", _calibration_ids())
    expected = get_weight(old).double()[:, removed] @ x.mean(0)[removed]
    assert torch.allclose(new.bias.double(), expected, atol=1e-10)
    for name, layer in prunable_layers(decoder_blocks(model)[0]).items():  # mlp_bias gives gate and up one too
        assert (layer.bias is not None) == name.startswith("mlp."), name


# ---- the maths against independent computations ------------------------------------------------

def test_least_squares_refit_is_exact_when_removed_inputs_are_combinations_of_kept_ones():
    generator = torch.Generator().manual_seed(0)
    kept_inputs = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    mix = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    x = torch.cat([kept_inputs, kept_inputs @ mix + 0.7], dim=1)  # inputs 6..8 depend on 0..5 and a constant
    weight = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, generator=generator, dtype=torch.float64)
    gram, total = x.t() @ x, x.sum(0)
    new_weight, new_bias = least_squares(weight, bias, gram, total, len(x), list(range(6)), fit_bias=True, damp=0.0)
    assert torch.allclose(kept_inputs @ new_weight.t() + new_bias, x @ weight.t() + bias, atol=1e-8)
    # Without a bias to fit, the constant part cannot be recovered: the fit is the least-squares one.
    fitted, same_bias = least_squares(weight, bias, gram, total, len(x), list(range(6)), fit_bias=False, damp=0.0)
    assert torch.equal(same_bias.double(), bias)
    reference = torch.linalg.lstsq(kept_inputs, x @ weight.t()).solution.t()
    assert torch.allclose(fitted, reference, atol=1e-8)


def test_bias_compensation_is_exact_for_constant_inputs():
    x = torch.randn(100, 5, dtype=torch.float64)
    x[:, [1, 3]] = torch.tensor([2.0, -0.5], dtype=torch.float64)  # two constant channels
    weight = torch.randn(3, 5, dtype=torch.float64)
    gained = compensation(weight, x.mean(0), [1, 3])
    assert torch.allclose(x[:, [0, 2, 4]] @ weight[:, [0, 2, 4]].t() + gained, x @ weight.t(), atol=1e-12)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-opt"])  # OPT flattens [batch, tokens] before its MLP
def test_gradient_scores_are_the_loss_sensitivity_to_unit_gates(preset):
    """Against gates written out with autograd: m_u scales unit u's inputs to the consuming projection
    (m on the residual branch for blocks); score = sum over sequences of |dL_s/dm_u| at m = 1."""
    dense = load_model(f"random:{preset}", torch.float64).model
    ids = model_ids(3, 16)
    smap = structure_map(dense)
    kinds = ["channels", "blocks"] + (["heads"] if smap.heads.removable else [])
    scores = first_order(dense, smap, kinds, ids, "gradient", progress=False)

    gates, handles = [], []
    for block in decoder_blocks(dense):
        layers, mine = prunable_layers(block), {}
        for kind in kinds[:1] + kinds[2:]:
            coupling = smap.coupling(kind)
            consumer = next(m for m in coupling.members if m.axis == COLS)
            unit_of = torch.empty(coupling.num_units * consumer.indices.shape[1], dtype=torch.long)
            unit_of[consumer.indices.reshape(-1)] = torch.arange(coupling.num_units).repeat_interleave(
                consumer.indices.shape[1])
            gate = mine[kind] = torch.ones(coupling.num_units, dtype=torch.float64, requires_grad=True)
            handles.append(layers[consumer.layer].register_forward_pre_hook(
                lambda _m, i, g=gate, u=unit_of: (i[0] * g[u],)))
        branch = mine["blocks"] = torch.ones((), dtype=torch.float64, requires_grad=True)

        def on_block(_m, args, kwargs, output, m=branch):
            x = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            new = x + m * (out - x)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        handles.append(block.register_forward_hook(on_block, with_kwargs=True))
        gates.append(mine)
    logits = dense(input_ids=ids, use_cache=False).logits
    for handle in handles:
        handle.remove()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    losses = nll.view(len(ids), -1).mean(1)
    for index, mine in enumerate(gates):
        for kind, gate in mine.items():
            expected = sum(torch.autograd.grad(losses[s], gate, retain_graph=True)[0].abs() for s in range(len(ids)))
            assert torch.allclose(torch.as_tensor(scores[index][kind], dtype=torch.float64), expected, rtol=1e-8), kind


def test_taylor_scores_are_the_summed_weight_times_gradient_of_each_unit():
    """On GPT-2, whose Conv1D stores weights transposed: |w * dL/dw| summed over the channel's rows and column."""
    dense = load_model("random:tiny-gpt2", torch.float64).model
    ids = model_ids(2, 16)
    scores = first_order(dense, structure_map(dense), ["channels", "blocks"], ids, "taylor", progress=False)
    for p in dense.parameters():
        p.grad = None
    logits = dense(input_ids=ids, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    nll.view(len(ids), -1).mean(1).sum().backward()
    block = decoder_blocks(dense)[0]
    up, down = block.mlp.c_fc, block.mlp.c_proj  # Conv1D: weight [in, out]
    expected = (up.weight * up.weight.grad).abs().sum(0) + (down.weight * down.weight.grad).abs().sum(1)
    assert torch.allclose(scores[0]["channels"], expected.detach(), rtol=1e-8)
    total = sum(float((layer.weight * layer.weight.grad).abs().sum().detach())
                for layer in prunable_layers(block).values())
    assert float(scores[0]["blocks"]) == pytest.approx(total, rel=1e-8)


def test_an_identity_block_is_the_one_block_influence_and_angular_remove():
    model = load_model("random:tiny-gemma3", torch.float64).model  # three blocks with per-layer types
    with torch.no_grad():
        block = decoder_blocks(model)[1]
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    influence, states = hidden_states(model, model_ids(), progress=False)
    assert float(influence[1]) == pytest.approx(0.0, abs=1e-12) and float(influence.min()) == float(influence[1])
    assert S.angular_window(states, 1) == 1
    for method in ("block-influence", "angular"):
        loaded = LoadedModel(copy.deepcopy(model), ByteTokenizer(), "random:tiny-gemma3", "test")
        record = run(_spec("tiny-gemma3", method, "layers", 0.34, dtype="float64"), loaded=loaded)
        assert record.structure["removed_blocks"] == [1]
        assert loaded.model.config.layer_types == [model.config.layer_types[0], model.config.layer_types[2]]
        assert torch.allclose(model_logits(loaded.model), model_logits(model), atol=1e-10)


def test_angular_window_is_the_closest_pair_of_states_n_blocks_apart():
    base = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    turns = [0.9, 0.5, 0.05, 0.04, 0.8]  # block l rotates the state by turns[l] (radians, in one plane)

    def rotate(x, angle):
        c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
        out = x.clone()
        out[:, 0], out[:, 1] = c * x[:, 0] - s * x[:, 1], s * x[:, 0] + c * x[:, 1]
        return out

    base[:, 2:] = 0  # all in the rotated plane: angles add up
    states = [base]
    for angle in turns:
        states.append(rotate(states[-1], angle))
    assert S.angular_window(states, 1) == 3 and S.angular_window(states, 2) == 2
    assert float(S.angular_distance(states[2], states[4]).mean()) == pytest.approx(0.09 / torch.pi, rel=1e-4)


# ---- the budget ------------------------------------------------------------------------------------

SMOLLM2 = Sizes(num_blocks=30, block=3540096, num_heads=3, head=294912, head_counts=(1, 2, 3), num_channels=1536,
                channel=1728)  # SmolLM2-135M's decoder blocks


@pytest.mark.parametrize("pattern,sparsity,expected", [
    ("layers", 0.25, dict(blocks=8)),  # 7.5 blocks: a tie rounds half up
    ("layers", 0.3, dict(blocks=9)),
    ("heads", 0.1, dict(heads=1)),
    ("heads", 0.2, dict(heads=2)),
    ("channels", 0.25, dict(channels=512)),
    ("width", 0.25, dict(heads=1, channels=342)),  # attention is 25% of a block: 0.75 group -> 1, MLP the rest
    ("width", 0.1, dict(heads=0, channels=205)),
    ("channels", 0.0, dict()),
])
def test_budget_picks_the_counts_nearest_the_target(pattern, sparsity, expected):
    removal = plan_removal(pattern, sparsity, SMOLLM2)
    assert (removal.blocks, removal.heads, removal.channels) == (
        expected.get("blocks", 0), expected.get("heads", 0), expected.get("channels", 0))
    assert removal.fraction == pytest.approx(SMOLLM2.fraction(removal.blocks, removal.heads, removal.channels))


# ---- bad input: one line, before any work, nothing written --------------------------------------

@pytest.mark.parametrize("argv,fragment", [
    (["--pattern", "layers", "--sparsity", "0.99"], "would remove all 2 blocks"),
    (["--pattern", "heads", "--sparsity", "0.3"], "would remove every head"),
    (["--pattern", "channels", "--sparsity", "0.9"], "would remove every MLP channel"),
    (["--pattern", "width", "--sparsity", "0.95"], "would remove every MLP channel"),
    (["--pattern", "heads", "--sparsity", "0.1", "--model", "random:tiny-gpt2"], "head_dim is hidden_size"),
    (["--pattern", "width", "--model", "random:tiny-opt"], "pattern channels can still"),
    (["--pattern", "channels", "--method", "flap", "--model", "random:tiny-mistral"], "bias_compensation=false"),
    (["--pattern", "heads", "--method", "block-influence"], "scores whole blocks, not heads"),
    (["--pattern", "layers", "--method", "wanda"], "for --pattern layers choose one of magnitude, taylor"),
    (["--pattern", "layers", "--method", "sparsegpt"], "zeroes weights"),
    (["--pattern", "unstructured", "--method", "flap"], "removes whole units; give --pattern heads or channels"),
    (["--pattern", "2:4", "--method", "angular"], "give --pattern layers"),
    (["--pattern", "rows", "--method", "wanda"], "one of layers, heads, channels, width"),
    (["--pattern", "layers", "--method", "taylor", "--option", "reconstruct=true"], "leaves nothing to refit"),
    (["--pattern", "layers", "--method", "angular", "--option", "reconstruct=true"], "has no option 'reconstruct'"),
    (["--pattern", "heads", "--method", "wanda", "--checkpoint-dir", "CKPT"], "a structured run does not write"),
])
def test_bad_input_is_refused_in_one_line_before_any_work(argv, fragment, tmp_path, capsys):
    argv = [a.replace("CKPT", str(tmp_path / "ckpt")) for a in argv]
    base = ["prune", "--model", "random:tiny-llama", "--method", "magnitude", "--nsamples", "2", "--seqlen", "32",
            "--quiet", "--output", str(tmp_path / "o"), "--save-model", str(tmp_path / "m")]
    code = main(base + argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no temporary directories


def test_flap_without_bias_compensation_runs_where_the_bias_cannot_go():
    record, model, _ = _prune("tiny-mistral", "flap", "channels", 0.3, options={"bias_compensation": False})
    assert record.structure["config"] == {"intermediate_size": [128, 70]}  # as flap with the bias would keep
    assert all(layer.bias is None for layer in prunable_layers(decoder_blocks(model)[0]).values())


# ---- sweeps ------------------------------------------------------------------------------------------

def test_a_sweep_grid_of_criteria_and_patterns_keeps_the_pairs_that_apply(tmp_path):
    from oneshot.sweep.config import check_runs, label, load_config, uses_calibration

    config_path = tmp_path / "grid.yaml"
    config_path.write_text("models: [random:tiny-llama]\n"
                           "methods: [magnitude, wanda, block-influence]\n"
                           "patterns: [layers, heads, unstructured]\n"
                           "sparsities: [0.1, 0.2]\n"
                           "options: {reconstruct: [false, true]}\n"
                           "calibration: {nsamples: 2, seqlen: 32}\n")
    config = load_config(config_path)
    check_runs(config)
    found = sorted((r.method, r.pattern, r.sparsity, r.options.get("reconstruct")) for r in config.runs()[1:])
    expected = sorted(
        [("magnitude", "layers", s, None) for s in (0.1, 0.2)]  # a refit has nothing to do there
        + [("block-influence", "layers", s, None) for s in (0.1, 0.2)]
        + [(m, "heads", s, r) for m in ("magnitude", "wanda") for s in (0.1, 0.2) for r in (False, True)]
        + [(m, "unstructured", s, None) for m in ("magnitude", "wanda") for s in (0.1, 0.2)])
    assert found == expected
    runs = {(r.method, r.pattern, r.sparsity, r.options.get("reconstruct")): r for r in config.runs()}
    assert not uses_calibration(runs["magnitude", "heads", 0.1, False])
    assert uses_calibration(runs["magnitude", "heads", 0.1, True])  # the refit reads activations
    assert uses_calibration(runs["block-influence", "layers", 0.1, None])
    assert label(runs["wanda", "heads", 0.2, True]) == "random:tiny-llama wanda reconstruct=True heads 0.2"


@pytest.mark.parametrize("pattern", ["channels", "width"])
def test_channel_multiple_keeps_a_whole_number_of_quantised_blocks(pattern):
    """channel_multiple: the kept MLP width is a multiple of it (llama.cpp's Q4_0 needs rows of 32s), the
    removed fraction the nearest such count to the target; 1 (the default) leaves the nearest count as it was."""
    from oneshot.structured.budget import plan_removal

    from oneshot.models import build_random_model, structure_map
    from oneshot.structured.driver import model_sizes

    model = build_random_model("tiny-llama", torch.float32)
    sizes = model_sizes(model, structure_map(model))
    plain = plan_removal(pattern, 0.3, sizes)
    rounded = plan_removal(pattern, 0.3, sizes, channel_multiple=32)
    assert (sizes.num_channels - rounded.channels) % 32 == 0
    assert (sizes.num_channels - plain.channels) % 32 != 0  # the preset's nearest count is not one already
    record = run(RunSpec(model="random:tiny-llama", method="magnitude", pattern=pattern, sparsity=0.3,
                         options={"channel_multiple": 32}, calibration=Calibration(nsamples=2, seqlen=32),
                         eval=Evaluation(samples=1), progress=False))
    assert record.options["channel_multiple"] == 32
    assert record.structure["removed_fraction"] == pytest.approx(rounded.fraction)
