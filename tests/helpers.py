"""Plain helpers shared by the test modules: `from helpers import ...` (pytest puts tests/ on sys.path, as it
does for conftest.py; fixtures and markers live in conftest.py)."""
import torch

from oneshot.cli import main
from oneshot.spec import Calibration, Evaluation, RunSpec


def tiny_args(nsamples: int = 4, seqlen: int = 64, eval_samples: int = 2) -> list[str]:
    """`oneshot prune` flags for a quick, quiet run of the tiny random Llama."""
    return ["--model", "random:tiny-llama", "--nsamples", str(nsamples), "--seqlen", str(seqlen),
            "--eval-samples", str(eval_samples), "--quiet"]


# The tiny random Llama, 4 calibration windows of 64 tokens, 2 evaluation windows: as flags and as a RunSpec.
TINY_ARGS = tiny_args()
TINY_SPEC = RunSpec(model="random:tiny-llama", calibration=Calibration(nsamples=4, seqlen=64),
                    eval=Evaluation(samples=2), progress=False)

# A sweep of the same tiny runs on the CPU; fill in with .format(methods=..., patterns=..., sparsities=...).
TINY_SWEEP = """\
models: [random:tiny-llama]
methods: {methods}
patterns: {patterns}
sparsities: {sparsities}
calibration: {{source: wiki-offline, nsamples: 4, seqlen: 64, seed: 0}}
eval: {{ppl: [wiki-offline], samples: 2}}
device: cpu
results: out/results.jsonl
"""


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`oneshot ARGV` in this process: (exit code, stdout, stderr)."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def random_ids(n: int, seqlen: int, seed: int = 0, high: int = 512) -> torch.Tensor:
    """n windows of seqlen random token ids in [3, high), the same for the same seed."""
    return torch.randint(3, high, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def tokens_spec(source: str, model: str, method: str, pattern: str, sparsity: float | None, **changes) -> RunSpec:
    """A float32 CPU run of `model` calibrated on the `tokens:` file `source`, no evaluation, quiet."""
    fields = dict(model=model, method=method, pattern=pattern, sparsity=sparsity, calibration=Calibration(source),
                  eval=Evaluation((), None), progress=False, dtype="float32", device="cpu")
    fields.update(changes)
    return RunSpec(**fields)


def prune_keeping_models(source: str, preset: str, method: str, pattern: str, sparsity: float | None,
                         dtype=torch.float32, **changes):
    """Run the API on random:`preset` with a handle kept on the model: (record, pruned model, dense copy)."""
    import copy

    from oneshot import run
    from oneshot.models import load_model

    loaded = load_model(f"random:{preset}", dtype)
    dense = copy.deepcopy(loaded.model)
    spec = tokens_spec(source, f"random:{preset}", method, pattern, sparsity,
                       dtype=str(dtype).replace("torch.", ""), **changes)
    return run(spec, loaded=loaded), loaded.model, dense


def model_ids(n: int = 2, seqlen: int = 24, seed: int = 1) -> torch.Tensor:
    """Token ids the tiny random models read (their vocabulary is the 256 bytes and a few specials)."""
    return random_ids(n, seqlen, seed=seed, high=256)


@torch.no_grad()
def model_logits(model, ids=None) -> torch.Tensor:
    return model(input_ids=model_ids() if ids is None else ids, use_cache=False).logits
