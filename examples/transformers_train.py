"""A few training steps of a transformers model running on steelattn.

    python examples/transformers_train.py                  # tiny random Llama, CPU
    python examples/transformers_train.py --size large     # hidden 2048, 16/4 heads, B2 N4096, bf16 on CUDA
"""
import argparse
import time

import torch
import transformers

import steelattn.integrations.transformers as st


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("tiny", "large"), default="tiny")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if args.size == "large":
        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                       num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4)
        B, N = 2, 4096
    else:
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
        B, N = 2, 128
    st.register()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="steelattn",
                                                          torch_dtype=dtype).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (B, N), device=dev)
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        print(f"step {step}: loss {loss.item():.4f}, {1e3 * (time.perf_counter() - t0):.1f} ms")
    print("kernels:", st.get_stats()["dispatch"])


if __name__ == "__main__":
    main()
