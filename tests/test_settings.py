"""The settings table: every way of naming or reading a setting derives from it, and agrees with it."""
from pathlib import Path

import pytest

from oneshot import settings
from oneshot.cli import build_parser
from oneshot.errors import UsageError
from oneshot.settings import Spelling, apply_arguments, from_mapping, table, to_argv, to_mapping
from oneshot.spec import Calibration, Evaluation, Recovery, RunSpec

ROOT = Path(__file__).resolve().parent.parent

SPECS = [
    RunSpec(),
    RunSpec(model="random:tiny-llama", method="wanda", pattern="2:4", sequential=True, seed=3,
            calibration=Calibration("file:/tmp/a.txt", 4, 64), eval=Evaluation(("wiki-offline", "c4"), 2, "offline", 5),
            options={"percdamp": "0.05"}, batch_size=2, output="/tmp/out", dtype="float64"),
    RunSpec(method="sparsegpt", sparsity=0.7, allocation="owl", quantize="int4", group_size=32, symmetric=True,
            quant_method="gptq", format="gguf", save_model="/tmp/m", overwrite=True, offline=True, progress=False),
    RunSpec(method="wanda", sparsity=0.6, recover=Recovery(mode="lora", steps=7, lr=1e-3, schedule="linear", warmup=2,
                                                           lora_targets=("self_attn.q_proj",), eval_at=(3, 5),
                                                           iterative=2, iterative_schedule="cubic", distill=True,
                                                           temperature=2.0, alpha=0.5)),
    RunSpec(kind="recover", method="dense", model="/tmp/pruned", checkpoint_dir="/tmp/ck", resume=True,
            recover=Recovery(steps=9, batch_size=2, seqlen=64, train_data="file:/tmp/t.txt", checkpoint_every=3)),
    RunSpec(kind="eval", method="dense", model="random:tiny-llama",
            eval=Evaluation(ppl=(), tasks="offline", limit=10, batch_size="auto", bos=True)),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind + "-" + s.method)
def test_the_recorded_command_line_parses_back_to_the_same_spec(spec):
    argv = to_argv(spec)
    assert argv[:2] == ["oneshot", spec.kind]
    args = build_parser().parse_args(argv[1:])
    base = {"prune": RunSpec(), "eval": RunSpec(kind="eval", method="dense"),
            "recover": RunSpec(kind="recover", method="dense", recover=Recovery())}[spec.kind]
    assert apply_arguments(vars(args), base, spec.kind) == spec


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind + "-" + s.method)
def test_the_recorded_settings_read_back_as_a_run_config(spec):
    mapping = to_mapping(spec)
    again = from_mapping(mapping, "record", base=RunSpec(kind=spec.kind, method=spec.method))
    assert again.replace(progress=spec.progress) == spec


def test_every_setting_is_declared_whole():
    paths = [e.path for e in table()]
    assert len(paths) == len(set(paths))
    for e in table():
        assert e.setting.help and e.setting.help[0].islower() or e.setting.help[0].isupper()
        for command in e.setting.commands:
            flag = e.flag(command)
            assert flag and flag.startswith("--"), (e.path, command)
        if e.setting.choices:
            assert e.default in e.setting.choices or e.default is None, e.path
        if e.type in (int, float) and e.default is not None:
            settings.check_value(e, e.default)  # every default is inside its declared range
    for command in settings.COMMANDS:  # no two settings share a flag within a command
        flags = [e.flag(command) for e in settings.entries(command)]
        assert len(flags) == len(set(flags)), command


def test_messages_spell_a_setting_as_the_caller_does():
    assert Spelling("flag", "prune")("recover.steps") == "--recover-steps"
    assert Spelling("flag", "recover")("recover.steps") == "--steps"
    assert Spelling("flag", "recover")("model") == "--pruned"
    assert Spelling("key")("recover.steps") == "recover.steps"
    assert Spelling("sweep")("sparsity") == "sparsities"
    bad = RunSpec(calibration=Calibration(nsamples=0))
    for spelling, shown in ((Spelling("flag", "prune"), "--nsamples"), (Spelling("key"), "calibration.nsamples")):
        with spelling.active(), pytest.raises(UsageError, match=f"^{shown} must be a positive whole number \\(got 0\\)"):
            settings.check_values(bad)


@pytest.mark.parametrize("field, value, message", [
    ("symmetric", "false", "symmetric must be true or false \\(got the text 'false'"),
    ("seed", -1, "seed must be a whole number from 0 to 4294967295 \\(got -1\\)"),
    ("dtype", "float8", "unknown dtype 'float8'"),
    ("sparsity", 1.0, "sparsity must be a number in \\[0, 1\\) \\(got 1.0\\)"),
])
def test_a_value_outside_its_declared_type_or_range_is_one_line(field, value, message):
    with pytest.raises(UsageError, match=message):
        settings.check_values(RunSpec(**{field: value}))


def test_a_recovery_flag_without_its_steps_is_refused():
    args = build_parser().parse_args(["prune", "--iterative", "3"])
    with pytest.raises(UsageError, match="--iterative applies to recover; add --recover-steps N"):
        apply_arguments(vars(args), RunSpec(), "prune")


def test_an_option_given_twice_is_refused():
    args = build_parser().parse_args(["prune", "--option", "percdamp=0.1", "--option", "percdamp=0.2"])
    with pytest.raises(UsageError, match="--option percdamp is given twice"):
        apply_arguments(vars(args), RunSpec(), "prune")


def test_docs_cli_md_is_generated_from_the_table():
    from oneshot.cli.reference import markdown

    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == markdown(), "docs/cli.md is stale: python -m oneshot.cli.reference > docs/cli.md"
