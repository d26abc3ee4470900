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
