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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("tiny", "large"), default="tiny")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if args.size == "large":
        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                       num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4)
    else:
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
    st.register()  # 1: register the implementation
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="steelattn", torch_dtype=dtype).to(dev).eval()  # 2: ask for it
    ids = torch.randint(0, cfg.vocab_size, (1, 64), device=dev)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
    dt = time.perf_counter() - t0
    print(f"{args.tokens} tokens in {dt:.2f} s ({args.tokens / dt:.1f} tok/s) on {dev}; stats {st.get_stats()['calls']}")
    print(out[0, -args.tokens:].tolist())


if __name__ == "__main__":
    main()
