"""Run locuslab/wanda's own prune functions on our model and windows, for side-by-side timings.

The reference is imported from a checkout at run time and never copied here. Only its environment
is adapted: transformers >= 4.48 decoder blocks need `position_embeddings` and return a tensor, and
the reference calls CUDA-only functions that a CPU build of torch lacks.
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn


class _BlockShim(nn.Module):
    """Gives a transformers-5 decoder block the 4.3x calling convention the reference uses."""

    def __init__(self, block: nn.Module, rotary: nn.Module):
        super().__init__()
        self.block = block
        object.__setattr__(self, "rotary", rotary)  # not a child module: the reference walks children

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
        if position_ids is None:
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        cos_sin = self.rotary(hidden_states, position_ids=position_ids)
        out = self.block(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                         position_embeddings=cos_sin, **kwargs)
        return out if isinstance(out, tuple) else (out,)


@contextlib.contextmanager
def _cpu_safe():
    """The reference calls torch.cuda.synchronize/empty_cache and .cuda(); make them no-ops on CPU."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.empty_cache, torch.Tensor.cuda
    torch.cuda.synchronize = torch.cuda.empty_cache = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.empty_cache, torch.Tensor.cuda = saved


@contextlib.contextmanager
def _as_reference_sees_it(model, seqlen: int, device: str, device_map: bool = True):
    """The model as the 2023 reference code expects it, for the duration of a call: every decoder block
    behind _BlockShim, `model.seqlen` set (and an empty `hf_device_map`, which locuslab-style code reads), on
    `device`, CUDA-only calls safe on a CPU, the reference's prints swallowed; the blocks and the CPU after."""
    blocks = model.model.layers
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _BlockShim(block, model.model.rotary_emb)
    model.seqlen = seqlen
    if device_map:
        model.hf_device_map = {}
    model.to(device)
    try:
        with _cpu_safe(), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        model.to("cpu")


def _nm(pattern: str) -> tuple[int, int]:
    """(N, M) of an N:M pattern as the references take them (prune_n, prune_m); (0, 0) for unstructured."""
    return (0, 0) if pattern == "unstructured" else tuple(map(int, pattern.split(":")))


def run_reference(checkout: Path, model, method: str, pattern: str, ids: torch.Tensor, device: str,
                  sparsity: float = 0.5) -> None:
    """Prune `model` in place with locuslab/wanda's prune_<method> (magnitude, wanda, sparsegpt) at `sparsity`,
    on calibration windows `ids`; "dense" leaves it as it is."""
    if method == "dense":
        return
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    tf32 = torch.backends.cuda.matmul.allow_tf32  # the reference turns TF32 off for the whole process
    import lib.prune as reference

    torch.backends.cuda.matmul.allow_tf32 = tf32
    reference.get_loaders = lambda *a, **k: ([(row[None], None) for row in ids], None)
    n, m = _nm(pattern)
    args = SimpleNamespace(nsamples=ids.shape[0], seed=0, sparsity_ratio=sparsity, use_variant=False)
    with _as_reference_sees_it(model, ids.shape[1], device):
        getattr(reference, f"prune_{method}")(args, model, None, torch.device(device), prune_n=n, prune_m=m)


def reference_perplexity(checkout: Path, model, eval_ids: torch.Tensor, device: str) -> float:
    """locuslab/wanda's own eval_ppl_wikitext on the windows `eval_ids` [n, seqlen] (joined, as its loader gives)."""
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from lib.eval import eval_ppl_wikitext

    model.seqlen = eval_ids.shape[1]
    model.to(device)
    try:
        with _cpu_safe(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            return float(eval_ppl_wikitext(model, SimpleNamespace(input_ids=eval_ids.reshape(1, -1)), 1,
                                           torch.device(device)))
    finally:
        model.to("cpu")


# RIA (biomedical-cybernetics/Relative-importance-and-activation-pruning): its lib/prune.py, prune_ria.
_RIA_ARGS = {"a": 0.5, "per_outneuron": False, "reallocation": False, "importance_score": "sum", "lsa": False}


def _ria_module(checkout: Path):
    """The RIA checkout's lib/prune.py, imported as its own package (not `lib`, which is locuslab/wanda's too)."""
    import hashlib
    import importlib
    import types

    folder = (Path(checkout) / "lib").resolve()
    name = "_ria_reference_" + hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]  # lib/ has no __init__.py
        sys.modules[name] = package
    tf32 = torch.backends.cuda.matmul.allow_tf32  # its lib/sparsegpt.py turns TF32 off for the process
    module = importlib.import_module(f"{name}.prune")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return module


@contextlib.contextmanager
def _permutation_device(device: str):
    """prune_ria solves its linear sum assignment on the hard-coded device "cuda:7"; use ours instead."""
    saved = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple(device if isinstance(a, str) and a == "cuda:7" else a for a in args)
        if kwargs.get("device") == "cuda:7":
            kwargs["device"] = device
        return saved(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = saved


def run_ria_reference(checkout: Path, model, method: str, pattern: str, ids: torch.Tensor, device: str,
                      sparsity: float = 0.5, options: dict | None = None) -> None:
    """Prune `model` in place with the RIA authors' prune_ria (method "ria", or "wanda" as their code runs it)
    at `sparsity` on calibration windows `ids`; `options` are ours (oneshot.methods.ria.RIA_OPTIONS), given
    to prune_ria as the command-line flags they stand for."""
    if method == "dense":
        return
    if method not in ("ria", "wanda"):
        raise ValueError(f"the RIA reference runs ria and wanda (its prune_ria), not {method!r}")
    from oneshot.methods import METHODS

    given = METHODS["ria"].check_options(options)  # ours, typed; their flags have the same names
    if given.pop("lsa_blocks", 1) != 1:
        raise ValueError("lsa_blocks > 1 has no exact counterpart: the authors' --fast picks 4, 8 or 16 blocks "
                         "by layer name")
    reference = _ria_module(checkout)
    reference.get_loaders = lambda *a, **k: ([(row[None], None) for row in ids], None)
    n, m = _nm(pattern)
    # model="llama" selects its model.model.layers code path (every decoder-only model we load has it).
    args = SimpleNamespace(**{**_RIA_ARGS, **given}, model="llama", prune_method=method, nsamples=ids.shape[0], seed=0,
                           seqlen=ids.shape[1], calib_dataset="c4", sparsity_ratio=sparsity, sparsity_type=pattern,
                           reconstruction=False, gptq=False, semi_sparse_acc=False, fast=False)
    with _as_reference_sees_it(model, ids.shape[1], device), _permutation_device(device):
        reference.prune_ria(args, model, None, torch.device(device), prune_n=n, prune_m=m)


# DSnoT (zyxxmu/DSnoT): its lib/prune.py, prune_DSnoT. Our option names -> their argparse names.
_DSNOT_FLAGS = {"base": "initial_method", "without_dsnot": "without_DSnoT", "max_cycle_time": "max_cycle_time",
                "update_threshold": "update_threshold", "pow_of_var_regrowing": "pow_of_var_regrowing",
                "skip_layer": "skip_layer", "skip_sub_layer": "skip_sub_layer", "without_same_sign": "without_same_sign"}


def _dsnot_module(checkout: Path, name: str):
    """A module of the DSnoT checkout's lib/ (prune, sparsegpt), imported as its own package (not `lib`, which
    locuslab/wanda has too)."""
    import hashlib
    import importlib
    import types

    folder = (Path(checkout) / "lib").resolve()
    package = "_dsnot_reference_" + hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    if package not in sys.modules:
        module = types.ModuleType(package)
        module.__path__ = [str(folder)]  # lib/ has no __init__.py
        sys.modules[package] = module
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # its imports turn TF32 off
    module = importlib.import_module(f"{package}.{name}")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return module


@contextlib.contextmanager
def _float64_for(model):
    """For a float64 model, the reference's own arithmetic in float64 too: it makes buffers with the default
    dtype and casts with .type(torch.float32) and .float() (a numerical study; as published their code keeps
    these in float32). A float32 model: unchanged."""
    if next(model.parameters()).dtype != torch.float64:
        yield
        return
    saved = torch.get_default_dtype(), torch.Tensor.type, torch.Tensor.float

    def as_type(tensor, dtype=None, *args, **kwargs):
        if dtype is None:
            return saved[1](tensor)
        return saved[1](tensor, torch.float64 if dtype in (torch.float32, "torch.FloatTensor") else dtype, *args,
                        **kwargs)

    torch.set_default_dtype(torch.float64)
    torch.Tensor.type, torch.Tensor.float = as_type, lambda tensor, *a, **k: tensor.to(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(saved[0])
        torch.Tensor.type, torch.Tensor.float = saved[1], saved[2]


def run_dsnot_reference(checkout: Path, model, method: str, pattern: str, ids: torch.Tensor, device: str,
                        sparsity: float = 0.5, options: dict | None = None, accumulate_hessian: bool = True) -> None:
    """Prune `model` in place with the DSnoT authors' prune_DSnoT at `sparsity` on calibration windows `ids`;
    `options` are ours (oneshot.methods.dsnot.DSNOT_OPTIONS), given as the flags they stand for (their
    defaults otherwise, which are ours).

    Adapted besides the environment: their wrapped layer allocates SparseGPT's Hessian for --initial_method
    sparsegpt but never accumulates it (it stays 0, every input counts as dead, and each row's first
    columns are pruned); with `accumulate_hessian` their own SparseGPT class accumulates it beside.
    Their layer names come from find_layers on the block itself (self_attn.q_proj), not on our wrapper."""
    if method == "dense":
        return
    if method != "dsnot":
        raise ValueError(f"the DSnoT reference runs dsnot (its prune_DSnoT), not {method!r}")
    from oneshot.methods import METHODS
    from oneshot.methods.options import defaults

    given = METHODS["dsnot"].check_options(options)
    if given.pop("percdamp", 0.01) != 0.01:
        raise ValueError("their SparseGPT score always damps with percdamp 0.01")
    flags = {_DSNOT_FLAGS[k]: v for k, v in (defaults(METHODS["dsnot"].options) | given).items() if k in _DSNOT_FLAGS}
    reference = _dsnot_module(checkout, "prune")
    sparsegpt = _dsnot_module(checkout, "sparsegpt").SparseGPT
    wrapped = reference.WrappedGPT if not hasattr(reference.WrappedGPT, "_shim_base") else \
        reference.WrappedGPT._shim_base
    find_layers = getattr(reference.find_layers, "_shim_base", reference.find_layers)

    class WithHessian(wrapped):
        _shim_base = wrapped

        def __init__(self, layer, initial_method=None, *rest, **kw):
            super().__init__(layer, initial_method, *rest, **kw)
            self._sparsegpt = sparsegpt(layer) if initial_method == "sparsegpt" and accumulate_hessian else None

        def add_batch(self, inp, out):
            super().add_batch(inp, out)
            if self._sparsegpt is not None:
                self._sparsegpt.add_batch(inp, out)
                self.H = self._sparsegpt.H

    def find_in_block(module, layers=(nn.Linear,), name=""):
        return find_layers(module.block if isinstance(module, _BlockShim) else module, list(layers), name)

    find_in_block._shim_base = find_layers
    reference.WrappedGPT, reference.find_layers = WithHessian, find_in_block
    reference.get_loaders = lambda *a, **k: ([(row[None], None) for row in ids], None)
    n, m = _nm(pattern)
    args = SimpleNamespace(**flags, prune_method="DSnoT", nsamples=ids.shape[0], seed=0, sparsity_ratio=sparsity,
                           sparsity_type=pattern, pow_of_var_pruning=1.0, get_time_overhead=False)
    with _as_reference_sees_it(model, ids.shape[1], device), _float64_for(model):
        reference.prune_DSnoT(args, model, None, torch.device(device), prune_n=n, prune_m=m)


# Reference implementations by name: (checkout, model, method, pattern, ids, device, sparsity) -> None, in place.
REFERENCES = {"wanda": run_reference}
REFERENCES["ria"] = run_ria_reference
REFERENCES["dsnot"] = run_dsnot_reference


# ALPS (mazumder-lab/ALPS): its llama.py (llama_sequential, llama_eval) driving its alps.py (ALPS_prune).
_ALPS_FIXED = {"percdamp": 0.01, "cg_iters": 10, "cg_rtol": 1e-4}  # hard-coded inside their ALPS_admm


def _alps_modules(checkout: Path):
    """Their alps.py and llama.py from the checkout, under their own top-level names (they import each other
    and modelutils by those names), with the TF32 switches alps.py turns off restored."""
    folder = str(Path(checkout).resolve())
    for name in ("alps", "llama", "modelutils"):
        loaded = sys.modules.get(name)
        if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(folder):
            raise RuntimeError(f"a module {name!r} from elsewhere ({getattr(loaded, '__file__', '?')}) is already "
                               "imported; run the ALPS reference in a process of its own")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with contextlib.redirect_stdout(io.StringIO()):  # modelutils prints its device on import
        import alps as alps_module
        import llama as llama_module
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return alps_module, llama_module


@contextlib.contextmanager
def _alps_environment(alps_module, device: str, overrides: dict):
    """alps.py names its device twice, the module global `dev` and the literal "cuda:0" in .to() calls: both
    become `device`. For a float64 model, ALPS_prune's methods get float64 where they call .float() or create
    tensors with the default dtype (a numerical study; as published their code computes in float32). `overrides`
    (rho, max_iter, update_iter, switch_iter) reach ALPS_admm, whose caller passes only rho=0.1."""
    cls = alps_module.ALPS_prune
    saved_dev, saved_to, saved_float = alps_module.dev, torch.Tensor.to, torch.Tensor.float
    saved_methods = {name: cls.__dict__[name] for name in ("__init__", "add_batch", "ALPS_admm")}

    def to(self, *args, **kwargs):
        args = tuple(device if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
            kwargs["device"] = device
        return saved_to(self, *args, **kwargs)

    def float64_inside(method, extra=None):
        def wrapped(self, *args, **kwargs):
            kwargs = {**kwargs, **(extra or {})}
            layer = self.layer if hasattr(self, "layer") else args[0]
            if layer.weight.dtype != torch.float64:
                return method(self, *args, **kwargs)
            default = torch.get_default_dtype()
            torch.Tensor.float = lambda tensor, *a, **k: tensor.to(torch.float64)
            torch.set_default_dtype(torch.float64)
            try:
                return method(self, *args, **kwargs)
            finally:
                torch.Tensor.float = saved_float
                torch.set_default_dtype(default)
        return wrapped

    alps_module.dev = device
    torch.Tensor.to = to
    cls.__init__ = float64_inside(saved_methods["__init__"])
    cls.add_batch = float64_inside(saved_methods["add_batch"])
    cls.ALPS_admm = float64_inside(saved_methods["ALPS_admm"], overrides)
    try:
        yield
    finally:
        alps_module.dev, torch.Tensor.to = saved_dev, saved_to
        for name, method in saved_methods.items():
            setattr(cls, name, method)


def run_alps_reference(checkout: Path, model, method: str, pattern: str, ids: torch.Tensor, device: str,
                       sparsity: float = 0.5, options: dict | None = None) -> None:
    """Prune `model` in place with the ALPS authors' llama_sequential and ALPS_prune.ALPS_admm at `sparsity` (or
    N:M) on calibration windows `ids`. `options` are ours (oneshot.methods.alps.ALPS_OPTIONS): rho, max_iter,
    update_iter and switch_iter are ALPS_admm's own arguments; percdamp, cg_iters and cg_rtol are fixed there."""
    if method == "dense":
        return
    if method != "alps":
        raise ValueError(f"the ALPS reference runs alps, not {method!r}")
    from oneshot.methods import METHODS

    given = METHODS["alps"].check_options(options)
    fixed = sorted(name for name, value in given.items() if name in _ALPS_FIXED and value != _ALPS_FIXED[name])
    if fixed:
        raise ValueError(f"{', '.join(fixed)}: hard-coded in the authors' ALPS_admm ({_ALPS_FIXED})")
    overrides = {name: value for name, value in given.items() if name not in _ALPS_FIXED}
    alps_module, llama_module = _alps_modules(checkout)
    n, m = _nm(pattern)
    # Their nm_n counts the weights KEPT in each group of nm_m; our N counts the pruned ones.
    llama_module.args = SimpleNamespace(nsamples=ids.shape[0], method="ALPS", sp=sparsity, nm_n=m - n if m else 0,
                                        nm_m=m)
    with _as_reference_sees_it(model, ids.shape[1], device, device_map=False), \
            _alps_environment(alps_module, device, overrides):
        llama_module.llama_sequential(model, [(row[None],) for row in ids], torch.device(device), nsamples=ids.shape[0])


def alps_perplexity(checkout: Path, model, eval_ids: torch.Tensor, device: str) -> float:
    """The ALPS authors' own llama_eval on the windows `eval_ids` [n, seqlen] (joined, as their loader gives)."""
    _alps_module, llama_module = _alps_modules(checkout)
    with _as_reference_sees_it(model, eval_ids.shape[1], device, device_map=False), torch.no_grad():
        return float(llama_module.llama_eval(model, SimpleNamespace(input_ids=eval_ids.reshape(1, -1)),
                                             torch.device(device)))


REFERENCES["alps"] = run_alps_reference
# A reference's own perplexity where it is not locuslab/wanda's lib/eval.py (reference_perplexity).
PERPLEXITIES = {"alps": alps_perplexity}
