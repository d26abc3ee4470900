"""The run API's seams: RunSpec -> run() -> Record, method options end to end, dense as a method,
per-layer targets, stages, YAML configs with flag overrides, sweeps equal to single runs, no import cycles."""
import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from oneshot import run
from oneshot.allocation import ALLOCATIONS, Allocation
from oneshot.cli import main
from oneshot.engine import DEFAULT_STAGES, layer_names, prune_model
from oneshot.errors import UsageError
from oneshot.methods import METHODS, get_method, parse_pattern
from oneshot.models import build_random_model, decoder_blocks, get_weight, prunable_layers
from oneshot.spec import Evaluation

from helpers import TINY_SPEC, random_ids

KEYS_0_2_0 = {"model", "model_source", "family", "method", "pattern", "sparsity_target", "sparsity_measured",
              "sparsity_per_layer", "method_notes", "ppl", "eval", "zeroshot", "calibration", "seed", "timings",
              "peak_memory_gib", "peak_memory_kind", "device", "dtype", "versions", "command", "finished_at"}


def test_run_returns_a_record_with_every_0_2_0_key(tmp_path):
    record = run(TINY_SPEC.replace(method="wanda", output=str(tmp_path / "o")))
    written = json.loads((tmp_path / "o" / "result.json").read_text())
    assert KEYS_0_2_0 <= set(written) and written == json.loads(record.to_json())
    assert written["schema_version"] == 3 and written["options"] == {}
    assert written["allocation"] == {"name": "uniform", "options": {}}
    assert set(written["sparsity_target_per_layer"].values()) == {0.5}
    assert written["sparsity_target_per_layer"].keys() == written["sparsity_per_layer"].keys()
    assert written["threads"] == torch.get_num_threads()  # a bit-for-bit rerun needs the same count


def test_a_cpu_record_names_the_cpu_and_the_kernels_torch_picked():
    # float32 sums differ between AVX2 and AVX512 kernels, so a figure is only reproducible on the same path
    from oneshot.record import cpu_model, device_name

    name = device_name("cpu")
    assert cpu_model() in name and torch.backends.cpu.get_cpu_capability() in name
    assert f"{torch.get_num_threads()} threads" in name


def test_options_reach_the_method_typed(monkeypatch):
    seen = []
    real = METHODS["sparsegpt"]

    def spy(weight, stat, sparsity, pattern, **options):
        seen.append(options)
        return real.prune(weight, stat, sparsity, pattern, **options)

    monkeypatch.setitem(METHODS, "sparsegpt", dataclasses.replace(real, prune=spy))
    record = run(TINY_SPEC.replace(method="sparsegpt", options={"percdamp": "0.2", "blocksize": 32}, eval=Evaluation(ppl=())))
    assert seen and all(options == {"percdamp": 0.2, "blocksize": 32} for options in seen)
    assert record.options == {"percdamp": 0.2, "blocksize": 32}
    assert "--option" in record.command and "percdamp=0.2" in record.command


def test_an_option_changes_the_result():
    model_a, model_b = build_random_model("tiny-llama", torch.float64), build_random_model("tiny-llama", torch.float64)
    method = get_method("sparsegpt")
    prune_model(model_a, method, 0.5, parse_pattern("unstructured"), random_ids(4, 32), progress=False)
    prune_model(model_b, method, 0.5, parse_pattern("unstructured"), random_ids(4, 32), progress=False,
                options={"percdamp": 1.0})
    assert any(not torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


@pytest.mark.parametrize("argv,fragment", [
    (["--method", "sparsegpt", "--option", "percdamp=-1"], "percdamp=-1"),
    (["--method", "sparsegpt", "--option", "percdamp=lots"], "expected percdamp (float"),
    (["--method", "sparsegpt", "--option", "blocksize=0"], "blocksize"),
    (["--method", "sparsegpt", "--option", "kernel=cuda"], "auto|torch"),
    (["--method", "wanda", "--option", "percdamp=0.1"], "method wanda has no option 'percdamp'; its options: none"),
    (["--method", "sparsegpt", "--option", "nope=1"], "its options: percdamp (float"),
    (["--method", "sparsegpt", "--option", "percdamp"], "is not NAME=VALUE"),
    (["--allocation", "uneven"], "unknown allocation 'uneven'; choose one of uniform"),
])
def test_a_bad_option_is_refused_in_one_line_before_any_work(argv, fragment, tmp_path, capsys):
    code = main(["prune", "--model", "random:tiny-llama", "--nsamples", "2", "--seqlen", "32", "--quiet",
                 "--output", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and fragment in err and "loading" not in err, err
    assert not (tmp_path / "o").exists()


def test_dense_is_a_method_that_changes_nothing():
    model = build_random_model("tiny-llama", torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_model(model, get_method("dense"), 0.0, parse_pattern("unstructured"), None, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.sparsity == 0.0 and set(report.layer_target.values()) == {0.0}


@pytest.mark.parametrize("method_name", ["magnitude", "wanda", "sparsegpt"])
def test_per_layer_targets_are_honoured_exactly(method_name):
    model = build_random_model("tiny-llama", torch.float64)
    generator = torch.Generator().manual_seed(1)
    targets = {name: round(float(torch.rand((), generator=generator)) * 0.9, 3) for name in layer_names(model)}
    report = prune_model(model, get_method(method_name), targets, parse_pattern("unstructured"), random_ids(4, 32),
                         progress=False)
    assert report.layer_target == targets
    for index, block in enumerate(decoder_blocks(model)):
        for name, layer in prunable_layers(block).items():
            weight, p = get_weight(layer), targets[f"{index}.{name}"]
            zeros = int((weight == 0).sum())
            if method_name == "wanda":  # floor(cols * p) per row
                assert zeros == weight.shape[0] * int(weight.shape[1] * p)
            elif method_name == "magnitude":  # the inclusive threshold at rank floor(numel * p); no ties
                assert zeros == (int(weight.numel() * p) + 1 if p > 0 else 0)
            else:  # one inclusive threshold per 128-column block
                assert abs(zeros / weight.numel() - p) < 0.01


def test_an_allocation_plugs_in_through_the_spec(monkeypatch):
    """A registered allocation gives each layer its target; the record keeps target and measured per layer."""
    def alternate(layers, target, pattern, statistics, spread=0.2):
        return {name: target + (spread if i % 2 else -spread) for i, name in enumerate(layers)}

    from oneshot.methods import Option

    monkeypatch.setitem(ALLOCATIONS, "alternate", Allocation(
        "alternate", alternate, "test", options=(Option("spread", float, 0.2, minimum=0, maximum=0.4),)))
    record = run(TINY_SPEC.replace(method="wanda", allocation="alternate", options={"spread": 0.1}))
    targets = record.sparsity_target_per_layer
    assert sorted(set(round(v, 9) for v in targets.values())) == [0.4, 0.6]
    assert record.allocation == {"name": "alternate", "options": {"spread": 0.1}}
    for name, target in targets.items():
        assert abs(record.sparsity_per_layer[name] - target) < 0.02
    with pytest.raises(UsageError, match="spread"):
        run(TINY_SPEC.replace(method="wanda", allocation="alternate", options={"spread": 0.9}))


def test_stages_run_in_the_order_given():
    visits = []

    def note(visit):
        visits.append((visit.index, sorted(visit.stats)))

    model = build_random_model("tiny-llama", torch.float64)
    reference = build_random_model("tiny-llama", torch.float64)
    gather, prune, propagate = DEFAULT_STAGES
    prune_model(model, get_method("wanda"), 0.5, parse_pattern("2:4"), random_ids(4, 32), progress=False,
                stages=(gather, note, prune, note, propagate))
    prune_model(reference, get_method("wanda"), 0.5, parse_pattern("2:4"), random_ids(4, 32), progress=False)
    assert [index for index, _ in visits] == [0, 0, 1, 1]
    assert visits[0][1] and visits[1][1] == []  # statistics exist before pruning and are released after
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_yaml_config_with_flag_overrides(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: random:tiny-llama\nmethod: sparsegpt\nsparsity: 0.7\noptions: {percdamp: 0.05}\n"
                      "calibration: {source: wiki-offline, nsamples: 2, seqlen: 32}\neval: {ppl: [wiki-offline], "
                      "samples: 1}\noutput: out\n")
    assert main(["prune", "--config", str(config), "--sparsity", "0.3", "--option", "blocksize=16", "--quiet"]) == 0
    record = json.loads((tmp_path / "out" / "result.json").read_text())  # output is relative to the config
    assert (record["method"], record["sparsity_target"]) == ("sparsegpt", 0.3)
    assert record["options"] == {"percdamp": 0.05, "blocksize": 16}
    assert record["calibration"]["nsamples"] == 2
    config.write_text("model: random:tiny-llama\nmethod: wanda\nmethod: sparsegpt\n")
    assert main(["prune", "--config", str(config)]) == 2
    assert "given twice" in capsys.readouterr().err


def test_sweep_records_equal_prune_records(tmp_path, capsys):
    (tmp_path / "sweep.yaml").write_text(
        "models: [random:tiny-llama]\nmethods: [sparsegpt]\npatterns: [unstructured]\nsparsities: [0.5]\n"
        "options: {percdamp: [0.02]}\ncalibration: {source: wiki-offline, nsamples: 4, seqlen: 64, seed: 0}\n"
        "eval: {ppl: [wiki-offline], samples: 2}\ndevice: cpu\nresults: r.jsonl\n")
    assert main(["sweep", str(tmp_path / "sweep.yaml")]) == 0
    swept = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()][-1]
    assert main(["prune", "--model", "random:tiny-llama", "--method", "sparsegpt", "--sparsity", "0.5",
                 "--option", "percdamp=0.02", "--nsamples", "4", "--seqlen", "64", "--eval-samples", "2",
                 "--device", "cpu", "--quiet", "--output", str(tmp_path / "one")]) == 0
    single = json.loads((tmp_path / "one" / "result.json").read_text())
    varying = {"timings", "peak_memory_gib", "finished_at", "command", "run_key"}
    assert set(swept) - {"run_key"} == set(single)
    assert {k: v for k, v in swept.items() if k not in varying} == {k: v for k, v in single.items() if k not in varying}
    assert swept["options"] == {"percdamp": 0.02}


def _imports(path: Path, package_root: Path, known: set) -> set:
    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != module}
    return found


def test_no_import_cycles_among_modules():
    """Arrows point down: the module graph (package __init__ re-exports aside) has no cycle."""
    roots = [Path(__file__).resolve().parent.parent / name for name in ("oneshot", "calibration")]
    files = {}
    for root in roots:
        for path in root.rglob("*.py"):
            if path.name != "__init__.py":
                files[".".join(path.relative_to(root.parent).with_suffix("").parts)] = (path, root)
    graph = {name: _imports(path, root, set(files)) for name, (path, root) in files.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
