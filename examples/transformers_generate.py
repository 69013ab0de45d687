"""Greedy generation with a transformers model running on steelattn.

    python examples/transformers_generate.py                 # tiny random Llama, CPU
    python examples/transformers_generate.py --size large    # hidden 2048, 16/4 heads, bf16 on CUDA

Random weights (no download): the point is the switch, two lines, and the speed.
"""
import argparse
import time

import torch
import transformers

import steelattn.integrations.transformers as st
from _llama import device_and_dtype, llama_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("tiny", "large"), default="tiny")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    dev, dtype = device_and_dtype()
    cfg = llama_config(args.size)
    st.register()  # 1: register the implementation
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="steelattn", dtype=dtype).to(dev).eval()  # 2: ask for it
    ids = torch.randint(0, cfg.vocab_size, (1, 64), device=dev)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
    dt = time.perf_counter() - t0
    print(f"{args.tokens} tokens in {dt:.2f} s ({args.tokens / dt:.1f} tok/s) on {dev}; stats {st.get_stats()['calls']}")
    print(out[0, -args.tokens:].tolist())


if __name__ == "__main__":
    main()
