"""steelattn inside transformers (steelattn.integrations.transformers), end to end on tiny
random models in float32 on the CPU: logits against "eager", greedy generation token for
token (a left-padded batch included), and a training step's gradients. Llama-style GQA,
Gemma-2-style (softcap, alternating sliding window), gpt-oss-style (sinks, alternating
window) and Qwen-style with padding."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import steelattn  # noqa: E402
import steelattn.integrations.transformers as st  # noqa: E402
from steelattn.integrations.transformers import NAME  # noqa: E402


def _configs():
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    out = {"llama": transformers.LlamaConfig(**common)}
    out["gemma2"] = transformers.Gemma2Config(**dict(common, head_dim=32), attn_logit_softcapping=20.0,
                                              final_logit_softcapping=10.0, sliding_window=6,
                                              layer_types=["sliding_attention", "full_attention"])
    if hasattr(transformers, "GptOssConfig"):
        out["gpt_oss"] = transformers.GptOssConfig(**dict(common, head_dim=16), num_local_experts=2,
                                                   num_experts_per_tok=1, sliding_window=6,
                                                   layer_types=["sliding_attention", "full_attention"])
    out["qwen2"] = transformers.Qwen2Config(**common)
    return out


CONFIGS = _configs()


def _pair(name):
    """The same random weights under "eager" and "steelattn"."""
    st.register()
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    # each model its own config: from_config records the implementation on the config, and a
    # shared one would make the "eager" model run steelattn too
    eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    if name == "gpt_oss":
        for m in eager.modules():
            if hasattr(m, "sinks"):
                torch.nn.init.normal_(m.sinks, std=1.0)  # nonzero sinks so they matter
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="steelattn").eval()
    ours.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and ours.config._attn_implementation == NAME
    return eager, ours


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_generation_match_eager(name):
    eager, ours = _pair(name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 15), generator=g)
    st.reset_stats()
    with torch.no_grad():
        a, b = eager(ids).logits, ours(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # no padding: every layer, sliding ones included (15 tokens > window 6), runs mask-free
    assert set(st.get_stats()["calls"]) == {"mask-free"}, st.get_stats()
    assert "torch" not in st.get_stats()["dispatch"]["forward"], st.get_stats()
    ga = eager.generate(ids, max_new_tokens=20, do_sample=False)
    gb = ours.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_static_cache_generation_matches_eager(name):
    """A static cache has more key slots than the prompt: the prefill must not see the empty
    future slots (SDPA skips the mask there relying on top-left causal; we are bottom-right)."""
    eager, ours = _pair(name)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert torch.equal(eager.generate(ids, **kw), ours.generate(ids, **kw))


def test_left_padded_batch_generation_qwen():
    eager, ours = _pair("qwen2")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 97, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding on the first row
    ids[0, :5] = 0
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(b[0, 5:], a[0, 5:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b[1], a[1], rtol=1e-4, atol=1e-4)
    st.reset_stats()
    ga = eager.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    gb = ours.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ga, gb)
    # the prefill as one varlen call (2 layers), the decode steps with the mask
    calls = st.get_stats()["calls"]
    assert calls.get("padded (varlen)") == 2 and calls.get("mask tensor"), calls


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padded_batch_runs_as_varlen(name, side):
    """A padded batch's forward and training step run as one varlen call per layer (each
    row's tokens and its padding as separate sequences), sliding-window layers included:
    logits at the real positions and the gradients match eager's."""
    eager, ours = _pair(name)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 97, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    pads = {0: 4, 2: 9}  # row 1 unpadded
    for r, p in pads.items():
        cols = slice(0, p) if side == "left" else slice(13 - p, 13)
        mask[r, cols] = 0
        ids[r, cols] = 0
    real = mask.bool()
    st.reset_stats()
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(b[real], a[real], rtol=1e-4, atol=1e-4)
    assert st.get_stats()["calls"] == {"padded (varlen)": 2}, st.get_stats()
    assert "torch" not in st.get_stats()["dispatch"]["forward"], st.get_stats()
    # no loss term predicted from a padding position (its output is undefined: eager's is the
    # mean over every key, ours attention over the padding): the first real token of a
    # left-padded row gets no label
    labels = ids.masked_fill(~real, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(~real[:, :-1], -100)
    grads = []
    for m in (eager, ours):
        m.train()
        m.zero_grad()
        m(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        m.eval()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-4, msg=n)


@pytest.mark.parametrize("chunk", [1 << 24, 5], ids=["one chunk", "rows in chunks"])
def test_padded_varlen_refuses_other_masks(monkeypatch, chunk):
    """Only causal (and the layer's window) over one block of real tokens per row becomes a
    varlen call; a mask with a hole, a stray key or a wider window stays a mask."""
    monkeypatch.setattr(st, "_CHECK_ELEMS", chunk)
    B, N = 2, 9
    i, j = torch.arange(N)[:, None], torch.arange(N)[None]
    causal = (j <= i).expand(B, 1, N, N).clone()
    causal[0, :, :, :3] = False  # row 0: 3 left pads
    assert st.padded_varlen(causal, B, N, None) is not None
    assert st.padded_varlen(causal.clone(), B, N, 4) is None  # the mask has no window of 4
    holed = causal.clone()
    holed[1, :, :, 5] = False  # a padding token in the middle
    assert st.padded_varlen(holed, B, N, None) is None
    full = torch.ones(B, 1, N, N, dtype=torch.bool)  # not causal
    assert st.padded_varlen(full, B, N, None) is None
    stray = causal.clone()
    stray[1, 0, 8, 8] = True
    stray[1, 0, 7, 8] = True  # the last query row's chunk is fine, row 7 sees a future key
    assert st.padded_varlen(stray, B, N, None) is None
    cu = st.padded_varlen(causal, B, N, None)
    assert cu.tolist() == [0, 3, 9, 9, 18, 18]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_step_gradients_match_eager(name):
    eager, ours = _pair(name)
    eager.train(), ours.train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 16), generator=g)
    grads = []
    for m in (eager, ours):
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-4, msg=n)


def test_compatibility_report_and_unregister():
    rep = st.check_model_compatibility(CONFIGS["gemma2"])
    assert [r["type"] for r in rep] == ["sliding_attention", "full_attention"]
    assert "window (5, 0)" in rep[0]["notes"] and rep[0]["head_dim"] == 32
    st.register()
    st.unregister()
    from transformers import AttentionInterface
    assert "steelattn" not in AttentionInterface._global_mapping
    st.register()


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_packed_sequences_run_as_varlen(name):
    """Two sequences packed into one row with transformers' flash kwargs (cu_seq_lens_q/k,
    as DataCollatorWithFlattening gives them): one varlen call per layer, and the logits of
    each sequence equal its own forward's."""
    eager, ours = _pair(name)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 97, (1, 11), generator=g), torch.randint(0, 97, (1, 7), generator=g)
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(11), torch.arange(7)])[None]
    cu = torch.tensor([0, 11, 18], dtype=torch.int32)
    st.reset_stats()
    with torch.no_grad():
        packed = ours(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11,
                      max_length_k=11).logits
        ref_a, ref_b = eager(a).logits, eager(b).logits
    assert set(st.get_stats()["calls"]) == {"packed (varlen)"}, st.get_stats()
    torch.testing.assert_close(packed[:, :11], ref_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed[:, 11:], ref_b, rtol=1e-4, atol=1e-4)


def test_static_cache_decode_under_torch_compile():
    """The decode step compiled with fullgraph=True over a static cache (as transformers'
    generate compiles it): the mask function and the attention trace without a graph
    break, and the tokens equal eager's."""
    eager, ours = _pair("llama")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    tokens = []
    for m in (eager, ours):
        cache = transformers.StaticCache(config=m.config, max_cache_len=32)
        with torch.no_grad():
            nxt = m(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(9)).logits[:, -1:].argmax(-1)
            step = torch.compile(m.forward, fullgraph=True)
            out = []
            for t in range(3):
                nxt = step(nxt, past_key_values=cache, use_cache=True,
                           cache_position=torch.tensor([9 + t])).logits[:, -1:].argmax(-1)
                out.append(nxt)
        tokens.append(torch.cat(out, 1))
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("script,args", [("transformers_generate.py", ["--tokens", "3"]),
                                         ("transformers_train.py", ["--steps", "1"])])
def test_examples_run(script, args):
    """The two examples run as shipped (tiny config; on the GPU when there is one)."""
    import pathlib
    import subprocess
    import sys
    examples = pathlib.Path(__file__).resolve().parents[2] / "examples"
    res = subprocess.run([sys.executable, script, *args], cwd=examples, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
