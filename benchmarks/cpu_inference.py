"""CPU inference speed of a model as PyTorch runs it: prefill and greedy decoding, batch 1.

    OMP_NUM_THREADS=1 python benchmarks/cpu_inference.py --model smollm2-135m --dtype float32
    OMP_NUM_THREADS=1 python benchmarks/cpu_inference.py --model runs/quant/int4-g64/model

The model is loaded the way `oneshot eval` loads it (a saved directory, a compressed-tensors checkpoint,
unpacked to plain weights, or a .gguf file, dequantised), so this measures what PyTorch does with each
format on a CPU: it has no kernel that skips zeros (unstructured or 2:4) or multiplies int4/int8
weights, so every format runs as dense matmuls in the model's dtype. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oneshot.models import load_model  # noqa: E402
from oneshot.record import device_name  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    loaded = load_model(args.model, dtype=getattr(torch, args.dtype))
    model = loaded.model
    model.config.use_cache = True
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    prefill, decode = [], []
    with torch.no_grad():
        model(ids[:, :16])  # warm-up
        for _ in range(args.repeat):
            start = time.perf_counter()
            model(ids)
            prefill.append(time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(ids[:, :16], max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=0)
            decode.append(time.perf_counter() - start)
    prefill_s, decode_s = min(prefill), min(decode)
    print(json.dumps({"model": args.model, "dtype": args.dtype, "device": device_name("cpu"),
                      "prefill_tokens_per_s": args.prompt_tokens / prefill_s,
                      "decode_tokens_per_s": args.new_tokens / decode_s, "prompt_tokens": args.prompt_tokens,
                      "new_tokens": args.new_tokens, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
