"""A few training steps of a transformers model running on steelattn.

    python examples/transformers_train.py                  # tiny random Llama, CPU
    python examples/transformers_train.py --size large     # hidden 2048, 16/4 heads, B2 N4096, bf16 on CUDA
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
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    dev, dtype = device_and_dtype()
    cfg = llama_config(args.size)
    B, N = (2, 4096) if args.size == "large" else (2, 128)
    st.register()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="steelattn",
                                                          dtype=dtype).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (B, N), device=dev)
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        print(f"step {step}: loss {loss.item():.4f}, {1e3 * (time.perf_counter() - t0):.1f} ms")
    print("kernels:", st.get_stats()["dispatch"])


if __name__ == "__main__":
    main()
