"""RunSpec: everything that describes one run, as data. Each field is declared once, here, with its
default, help, CLI flag, range and owner (`setting(...)`, oneshot/settings.py); the CLI, run configs,
sweeps, records, messages and docs/cli.md are derived from these declarations.

A leaf: nothing here checks more than a field's declared type; plan.py asks each subsystem to check
the rest and returns the Plan that api.run executes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .settings import ALL, part, register, setting

DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")  # float64: for numerical studies
KINDS = ("prune", "eval", "recover")
SEED_LIMIT = 2**32  # numpy's and torch's seeds alike
FORMATS = ("hf", "compressed-tensors", "gguf")
RECOVER_MODES = ("full", "lora")
LR_SCHEDULES = ("constant", "linear", "cosine")
SPARSITY_SCHEDULES = ("linear", "cubic")
LORA_UPDATES = ("masked", "dense")
RUNTIMES = ("transformers", "llama.cpp")
STRUCTURED_PATTERNS = ("layers", "heads", "channels", "width", "experts")  # what each removes: see oneshot.structured
# Peak learning rates: LoRA's is Wanda's recipe (1e-4); full fine-tuning moves every kept weight, so less.
DEFAULT_LR = {"full": 5e-5, "lora": 1e-4}


@dataclass
class Calibration:
    source: str = setting(
        "wiki-offline", "calibration text: wiki-offline | c4 | wikitext2 | ptb | file:PATH | tokens:PATH",
        flag="--calibration", owner="calibration", source=True, always=True, metavar="SOURCE")
    nsamples: int | None = setting(
        None, "calibration windows", flag="--nsamples", minimum=1, owner="calibration",
        shown_default="128; every row of a tokens: file")
    seqlen: int | None = setting(
        None, "tokens per window, for calibration and perplexity", flag="--seqlen", commands=ALL, minimum=2,
        owner="calibration", shown_default="2048; a tokens: file's width")


@dataclass
class Evaluation:
    ppl: tuple[str, ...] = setting(
        ("wiki-offline",), "perplexity sources (as --calibration), comma-separated; none to skip",
        flag="--eval-ppl", commands=ALL, owner="evaluate", source=True, always=True, metavar="SOURCE,...")
    samples: int | None = setting(
        None, "evaluate at most this many windows per source", flag="--eval-samples", commands=ALL, minimum=1,
        owner="evaluate", shown_default="all")
    tasks: str = setting(
        "none", "zero-shot accuracy through lm-eval on the model in memory: a suite (offline | wanda | sparsegpt) or "
        "comma-separated lm-eval task names; none to skip", flag="--eval-tasks", commands=ALL, owner="evaluate",
        joins=True, metavar="SUITE|TASK,...")
    limit: int | None = setting(
        None, "evaluate at most this many documents per zero-shot task", flag="--eval-limit", commands=ALL,
        minimum=1, owner="evaluate", shown_default="all")
    bos: bool | None = setting(
        None, "start every perplexity window with the tokenizer's beginning-of-text token, then seqlen - 1 tokens "
        "of text", flag="--eval-bos", commands=ALL, owner="evaluate",
        shown_default="the family's convention: yes for Gemma, no for the papers' Llama and OPT protocol")
    runtime: str = setting(
        "transformers", "what computes perplexity: transformers (in this process) | llama.cpp (the GGUF file itself, "
        "through llama-cpp-python: what a deployment runs)", flag="--runtime", commands=("eval",),
        choices=RUNTIMES, owner="evaluate")
    batch_size: int | str | None = setting(
        None, "lm-eval batch size: a whole number or auto", flag="--eval-batch-size", commands=ALL, minimum=1,
        words=("auto",), owner="evaluate", keyed=False, shown_default="8 on CPU, 32 on CUDA", metavar="B|auto")


@dataclass
class Recovery:
    """Fine-tuning with the zero pattern locked (oneshot/recover): a run of kind "recover" (a saved pruned
    model), or the recovery that follows pruning in a prune run (present when recover.steps is given)."""

    mode: str = setting(
        "full", "full: the block linears train | lora: peft adapters, merged back sparse", flag="--recover-mode",
        commands=("prune", "recover"), flags={"recover": "--mode"}, choices=RECOVER_MODES, owner="recover")
    steps: int = setting(
        100, "optimiser steps (per stage with --iterative)", flag="--recover-steps", commands=("prune", "recover"),
        flags={"recover": "--steps"}, minimum=1, owner="recover", always=True, enables=True)
    lr: float | None = setting(
        None, "peak learning rate", flag="--recover-lr", commands=("prune", "recover"), flags={"recover": "--lr"},
        above=0, below=1, owner="recover", shown_default="5e-5 full, 1e-4 lora")
    schedule: str = setting(
        "cosine", "learning-rate schedule", flag="--recover-schedule", commands=("prune", "recover"),
        flags={"recover": "--schedule"}, choices=LR_SCHEDULES, owner="recover")
    warmup: int = setting(
        0, "warm-up steps, rising linearly to the peak", flag="--recover-warmup", commands=("prune", "recover"),
        flags={"recover": "--warmup"}, minimum=0, owner="recover")
    batch_size: int = setting(
        8, "windows per micro-batch", flag="--recover-batch-size", commands=("prune", "recover"),
        flags={"recover": "--batch-size"}, minimum=1, owner="recover")
    seqlen: int | None = setting(
        None, "tokens per training window", flag="--recover-seqlen", commands=("prune", "recover"),
        flags={"recover": "--train-seqlen"}, minimum=2, owner="recover", shown_default="512; a tokens: file's width")
    grad_accum: int = setting(
        1, "micro-batches per optimiser step", flag="--recover-grad-accum", commands=("prune", "recover"),
        flags={"recover": "--grad-accum"}, minimum=1, owner="recover")
    train_data: str = setting(
        "wiki-offline", "training text, as --calibration (its calibration split, never the evaluation one)",
        flag="--recover-data", commands=("prune", "recover"), flags={"recover": "--train-data"}, source=True,
        owner="recover", metavar="SOURCE")
    distill: bool = setting(
        False, "loss: KL to the dense base model's logits (the lineage card's base model, or --teacher)",
        flag="--distill", commands=("prune", "recover"), owner="recover")
    temperature: float = setting(
        1.0, "distillation temperature T; the KL is scaled by T^2", flag="--temperature",
        commands=("prune", "recover"), above=0, owner="recover")
    alpha: float = setting(
        1.0, "distillation's share of the loss, the rest next-token cross-entropy", flag="--distill-alpha",
        commands=("prune", "recover"), minimum=0, maximum=1, owner="recover")
    teacher: str | None = setting(
        None, "the dense model to distil from, instead of the base model", flag="--teacher",
        commands=("prune", "recover"), owner="recover", metavar="MODEL")
    lora_r: int = setting(8, "LoRA rank", flag="--lora-r", commands=("prune", "recover"), minimum=1, owner="recover")
    lora_alpha: int = setting(16, "LoRA alpha", flag="--lora-alpha", commands=("prune", "recover"), minimum=1,
                              owner="recover")
    lora_targets: tuple[str, ...] = setting(
        (), "layer names inside a block, comma-separated", flag="--lora-targets", commands=("prune", "recover"),
        owner="recover", shown_default="the query and value projections", metavar="LAYER,...")
    lora_update: str = setting(
        "masked", "masked: the adapters' update is masked to the kept weights in the forward, so they train the "
        "model that is saved | dense: peft's update, its pruned part dropped at the merge", flag="--lora-update",
        commands=("prune", "recover"), choices=LORA_UPDATES, owner="recover")
    checkpoint_every: int | None = setting(
        None, "steps between training checkpoints (with --checkpoint-dir)", flag="--checkpoint-every",
        commands=("recover",), minimum=1, owner="recover", keyed=False, shown_default="a tenth of the steps")
    eval_at: tuple[int, ...] = setting(
        (), "also measure perplexity after these steps, e.g. 50,100", flag="--recover-eval-at",
        commands=("prune", "recover"), flags={"recover": "--eval-at"}, owner="recover", metavar="STEP,...")
    iterative: int = setting(
        1, "reach the sparsity in K prune-recover stages", flag="--iterative", minimum=1, owner="recover",
        metavar="K")
    iterative_schedule: str = setting(
        "linear", "stage sparsities: linear | cubic (Zhu & Gupta)", flag="--iterative-schedule",
        choices=SPARSITY_SCHEDULES, owner="recover")

    @property
    def peak_lr(self) -> float:
        return DEFAULT_LR.get(self.mode, 1e-4) if self.lr is None else float(self.lr)

    @property
    def window(self) -> int | None:
        """Tokens per training window: the setting, 512, or None for a tokens: file's own width."""
        if self.train_data.startswith("tokens:"):
            return None
        return 512 if self.seqlen is None else self.seqlen


@register
@dataclass
class RunSpec:
    """One run. `kind` "prune" prunes and measures; "eval" measures a model as it is (method dense),
    taking method and pattern for its record from a saved model's lineage card; "recover" fine-tunes a
    saved pruned model."""

    model: str = setting(
        "smollm2-135m", "an embedded model (smollm2-135m, gemma3-270m), random:<preset>, a .gguf file, a local "
        "directory or a Hub id", flag="--model", commands=ALL, flags={"recover": "--pruned"}, owner="models", always=True,
        sweep="models", metavar="MODEL")
    method: str = setting(
        "sparsegpt", "dense | magnitude | wanda | sparsegpt | admm | alps | dsnot | ria | wanda++; with a "
        "structured --pattern, a criterion: "
        "magnitude | wanda | flap | taylor | gradient (heads, channels, width) or magnitude | taylor | gradient | "
        "block-influence | angular (layers) or frequency | reap | router-logit (experts)", flag="--method",
        always=True, sweep="methods", metavar="METHOD", owner="pruning")
    sparsity: float | None = setting(
        None, "fraction of weights to prune, in [0, 1) (N:M patterns fix it to N/M); with a structured pattern, "
        "the fraction of decoder-block parameters to remove (experts: of the routed experts in every MoE block)",
        flag="--sparsity", minimum=0, below=1, sweep="sparsities", shown_default="0.5", baseline=False,
        owner="pruning")
    pattern: str = setting(
        "unstructured", "unstructured, N:M (N of every M inputs pruned, e.g. 2:4), or whole units: layers, heads "
        "(KV groups), channels (MLP), width (heads and channels), experts (routed experts of every MoE block)",
        flag="--pattern", sweep="patterns", baseline=False, metavar="PATTERN", owner="pruning")
    allocation: str = setting(
        "uniform", "per-layer sparsity: uniform | owl (outlier-weighted; options owl_m, owl_lambda)",
        flag="--allocation", sweep="allocations", baseline=False, owner="allocation", metavar="ALLOCATION")
    sequential: bool = setting(
        False, "sublayer-sequential calibration: each group of layers (q/k/v, o, gate/up, down) is pruned before "
        "calibration data passes through it; the block runs once", flag="--sequential", baseline=False,
        owner="engine")
    asymmetric: bool = setting(
        False, "asymmetric calibration: each layer reconstructs the dense model's output of that layer from the "
        "pruned model's inputs (SparseGPT, ADMM, ALPS; with --sequential)", flag="--asymmetric", baseline=False,
        owner="engine")
    refit: int = setting(
        0, "block refit: once a block is pruned, this many passes of Adam over the calibration sequences fit its "
        "kept weights to the block's dense output (with --asymmetric: the dense model's); the mask stays "
        "(with --sequential; 0: none)", flag="--refit", minimum=0, maximum=1000, baseline=False, owner="engine",
        metavar="PASSES")
    refit_lr: float = setting(
        1e-3, "Adam's learning rate for --refit (chosen on held-out text: benchmarks/refit_validation.py)",
        flag="--refit-lr", above=0, maximum=1, baseline=False,
        owner="engine", metavar="LR")
    options: dict = setting(
        {}, "a method's or allocation's declared option, e.g. percdamp=0.1 (repeatable)", flag="--option",
        baseline=False, owner="pruning")
    calibration: Calibration = part(Calibration, "calibration windows")
    eval: Evaluation = part(Evaluation, "evaluation")
    seed: int = setting(
        0, "seed for calibration sampling, training windows and random models", flag="--seed", commands=ALL,
        minimum=0, below=SEED_LIMIT, always=True, aliases=("calibration.seed",))
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", flag="--device", commands=ALL, owner="models",
                          keyed=False, always=True)
    dtype: str = setting("auto", "model dtype (auto: float32 on CPU)", flag="--dtype", commands=ALL,
                         choices=DTYPES, owner="models", always=True)
    batch_size: int | None = setting(
        None, "sequences per block forward", flag="--batch-size", minimum=1, owner="engine", keyed=False,
        shown_default="about 16k tokens per batch on CUDA, 4k on CPU")
    output: str | None = setting(None, "directory for result.json", flag="--output", commands=ALL, owner="outputs",
                                 keyed=False, path=True, metavar="DIR")
    save_model: str | None = setting(
        None, "directory for the pruned model and its lineage card", flag="--save-model",
        commands=("prune", "recover"), owner="outputs", keyed=False, path=True, metavar="DIR")
    format: str = setting(
        "hf", "how --save-model writes it: hf (safetensors) | compressed-tensors (packed int8/int4, needs "
        "--quantize) | gguf (one .gguf file; Q8_0/Q4_0 when quantised)", flag="--format", choices=FORMATS,
        owner="quantize", keyed=False)
    quantize: str | None = setting(
        None, "also quantise the (pruned) weights: int8 | int4", flag="--quantize", owner="quantize",
        metavar="int8|int4")
    group_size: int | None = setting(
        None, "inputs per quantisation group", flag="--group-size", minimum=1, owner="quantize",
        shown_default="one group per output row")
    symmetric: bool = setting(False, "symmetric grid (zero point 0) instead of asymmetric", flag="--symmetric",
                              owner="quantize")
    quant_method: str = setting(
        "auto", "auto (joint with sparsegpt, gptq otherwise) | joint (inside SparseGPT's sweep) | gptq (after "
        "pruning, with the layer's Hessian) | rtn (round to nearest)", flag="--quant-method", owner="quantize",
        metavar="METHOD")
    quantize_head: bool = setting(
        False, "also quantise the output head (a tied head is the embeddings too) to int8, symmetric, groups of 32 "
        "(GGUF's Q8_0), by rounding to nearest: llama.cpp's own quantiser keeps the head finer than the blocks",
        flag="--quantize-head", owner="quantize")
    overwrite: bool = setting(False, "replace the contents of existing output directories", flag="--overwrite",
                              commands=ALL, owner="outputs", keyed=False)
    checkpoint_dir: str | None = setting(
        None, "save progress here (each finished block; recovery's training state), so that a killed run can "
        "continue with --resume", flag="--checkpoint-dir", commands=("prune", "recover"), owner="checkpoint",
        keyed=False, path=True, metavar="DIR")
    resume: bool = setting(False, "continue the run saved in --checkpoint-dir", flag="--resume",
                           commands=("prune", "recover"), owner="checkpoint", keyed=False)
    offline: bool = setting(False, "never contact the Hugging Face Hub (also automatic when it is unreachable)",
                            flag="--offline", commands=ALL, keyed=False)
    # None: when the weights would take more than half the available host memory.
    weights_on_disk: bool | None = setting(
        None, "models larger than host memory: read each decoder block from disk (a local safetensors checkpoint; "
        "a random: preset draws it) when the engine reaches it, and write the pruned model shard by shard",
        flag="--weights-on-disk", commands=ALL, owner="models", keyed=False,
        shown_default="when the weights exceed half the available memory")
    progress: bool = setting(True, "no progress bars", flag="--quiet", commands=ALL, negate=True, keyed=False,
                             yaml=False)
    recover: Recovery | None = part(Recovery, "recovery after pruning", optional=True)
    kind: str = "prune"  # the command: prune | eval | recover

    def replace(self, **changes) -> "RunSpec":
        return dataclasses.replace(self, **changes)

    def to_argv(self) -> list[str]:
        """The `oneshot` command line that runs this spec (recorded with every result)."""
        from .settings import to_argv

        return to_argv(self)
