"""End-to-end benchmark (bench.py --op e2e): transformers models with random weights, each
attention implementation on the same weights in the same process.

CUDA (bf16): train_llama / train_gemma2 (a training step, forward + backward, B2 N4096, 4
layers, hidden 2048; Llama-style 16/4 heads D128, Gemma-2-style 8/4 heads D256 with
softcap 50 and an alternating window of 1024), prefill_llama (8192 tokens, no grad),
decode_b1 / decode_b16 (greedy tokens/s with a static cache, the median of five
generations; transformers compiles the decode step with mode="reduce-overhead", i.e. CUDA
graphs). CPU: the same cases on tiny models (a smoke
run). Rows {"op": "e2e", "case", "impl", "ms" | "tok_s"}; implementations steelattn,
sdpa, eager and flash_attention_2/3/4 where transformers can load them.
"""
from __future__ import annotations

import copy
import time

import torch

from . import bench as _b

IMPLS = ("steelattn", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def _configs(large):
    import transformers
    if large:
        common = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                      max_position_embeddings=16384)
        llama = transformers.LlamaConfig(**common, num_attention_heads=16, num_key_value_heads=4)
        gemma = transformers.Gemma2Config(**common, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                          attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                          sliding_window=1024,
                                          layer_types=["sliding_attention", "full_attention"] * 2)
        return llama, gemma, dict(B=2, N=4096, prefill=8192, prompt=512, new=64)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=512)
    llama = transformers.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2)
    gemma = transformers.Gemma2Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      attn_logit_softcapping=50.0, sliding_window=16,
                                      layer_types=["sliding_attention", "full_attention"])
    return llama, gemma, dict(B=2, N=64, prefill=128, prompt=16, new=8)


def _model(cfg, impl, dev, dtype, state=None):
    import transformers
    torch.manual_seed(0)
    # a config per model: from_config records the implementation on the config it is given
    m = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl,
                                                      dtype=dtype).to(dev)
    if state is not None:
        m.load_state_dict(state)
    return m


def bench_e2e(device="cpu", quick=False, log=print, run=None):
    run = run or _b._Run(device, log=log)
    n0 = len(run.rows)
    try:
        import steelattn.integrations.transformers as st
        st.register()
    except ImportError as e:
        log(f"  e2e: transformers unavailable: {e}")
        return []
    cuda = device == "cuda"
    dev, dtype = (_b._CUDA, torch.bfloat16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    llama, gemma, sz = _configs(cuda)
    timer = _b.time_cuda if cuda else _b.time_cpu

    def add(case, impl, **val):
        run.add({"op": "e2e", "case": case, "impl": impl, "device": device, **val})
        log(f"  e2e {case} {impl}: " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
        run.flush()

    for case, cfg in (("train_llama", llama), ("train_gemma2", gemma), ("prefill_llama", llama),
                      ("decode_b1", llama), ("decode_b16", llama)):
        base = None
        for impl in IMPLS:
            if run.out_of_time():
                continue
            try:
                m = _model(cfg, impl, dev, dtype, base)
                if base is None:
                    base = {k: v.detach().clone() for k, v in m.state_dict().items()}
                g = torch.Generator(device=dev).manual_seed(1)
                if case.startswith("train"):
                    ids = torch.randint(0, cfg.vocab_size, (sz["B"], sz["N"]), device=dev, generator=g)
                    m.train()

                    def step(m=m, ids=ids):
                        m(ids, labels=ids).loss.backward()
                        m.zero_grad(set_to_none=True)
                    add(case, impl, ms=timer(step))
                elif case == "prefill_llama":
                    ids = torch.randint(0, cfg.vocab_size, (1, sz["prefill"]), device=dev, generator=g)
                    m.eval()

                    def fwd(m=m, ids=ids):
                        with torch.no_grad():
                            m(ids, logits_to_keep=1)
                    add(case, impl, ms=timer(fwd))
                else:
                    B = 1 if case == "decode_b1" else 16
                    ids = torch.randint(0, cfg.vocab_size, (B, sz["prompt"]), device=dev, generator=g)
                    m.eval()
                    kw = dict(max_new_tokens=sz["new"], min_new_tokens=sz["new"], do_sample=False,
                              cache_implementation="static")
                    # transformers compiles the decode step itself for a static cache on CUDA
                    # (CompileConfig: mode "reduce-overhead", i.e. CUDA graphs); compiling
                    # m.forward here as well made the graphs of prefill and decode overwrite
                    # each other's outputs (measured: every implementation failed).
                    m.generate(ids, **kw)  # warm-up: compiles and captures
                    # the median of five generations: one generation's time moved by ~5% run
                    # to run (decode_b1: eager ahead of sdpa at bf8d414), more than the
                    # implementations differ by
                    secs = []
                    for _ in range(5 if cuda else 1):
                        sync()
                        t0 = time.perf_counter()
                        m.generate(ids, **kw)
                        sync()
                        secs.append(time.perf_counter() - t0)
                    add(case, impl, tok_s=B * sz["new"] / sorted(secs)[len(secs) // 2])
                del m
            except Exception as e:
                log(f"  e2e {case} {impl} unavailable: {type(e).__name__}: {str(e)[:160]}")
            if cuda:
                torch.cuda.empty_cache()
    return run.rows[n0:]
