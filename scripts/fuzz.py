"""Random differential tests on any device: flash_attention (dense, every score modifier,
layouts, gradients), flash_attention_varlen, flash_attention_sparse and
flash_attention_kvcache (dense and paged caches, RoPE, appends) against a float64
reference written here, independently of steelattn.reference, and the
scaled_dot_product_attention drop-in against torch's own in float64. Each case draws its
shapes, dtype and features from a seeded generator and prints the ones that fail with
their relative errors, so a failure is reproduced by its seed and index.

Gradients are compared only where the logits' spread is small (fuzz_dense): past it, a row
with few keys is near one-hot, its gradients cancel, and torch's own SDPA in the same
dtype is as far from float64 as we are. Relative errors are floored at an RMS of 1e-4
(rel). tests/python/test_fuzz.py runs 40 cases of each kind per run with a fresh seed;
this script runs more, on the GPU machine too (`gpu-check fuzz`).
Usage: python3 scripts/fuzz.py [--device cpu|cuda] [--seed S] [--count N] [KIND ...]
       KIND: dense varlen sparse kvcache sdpa (default: all, in turn)"""
import argparse
import math
import traceback

import torch

import steelattn

DEV = "cpu"  # where steelattn runs; inputs are drawn on the CPU and moved there
MAX_SPREAD = 400.0  # cap on the dense cases' logit spread (amp^2 sqrt(D) scale); the suite's: 100


def dev(t, grad=False):
    """A copy of CPU tensor t on the device under test (None stays None)."""
    return None if t is None else t.detach().to(DEV).requires_grad_(grad)


def cpu(*ts):
    """The tensors back on the CPU, detached, for comparison."""
    return tuple(None if t is None else t.detach().cpu() for t in ts)


def ref_attention(q, k, v, scale, causal, wl, wr, softcap, alibi, bias, mask, sinks=None):
    """(out, lse) in float64 from the definition: q [B, H, N, D], k/v [B, Hkv, S, *]; the
    diagonal bottom-right (query i at key position i + S - N); window (wl, wr) around it,
    -1 unbounded; ALiBi -slope * |i - j|; bias added, mask (bool) ANDed; sinks [H] join
    the denominator. Rows with no key: zeros, lse -inf."""
    B, H, N, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    q, k, v = q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("bhnd,bhsd->bhns", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    off = S - N  # bottom-right aligned diagonal
    i = torch.arange(N).view(N, 1) + off
    j = torch.arange(S).view(1, S)
    if alibi is not None:
        sl = alibi.double().reshape(-1, H, 1, 1) if alibi.dim() == 2 else alibi.double().view(1, H, 1, 1)
        s = s - sl * (i - j).abs().double()
    if bias is not None:
        s = s + bias.double()
    keep = torch.ones(N, S, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if wl >= 0:
        keep &= j >= i - wl
    if wr >= 0:
        keep &= j <= i + wr
    keep = keep.expand(B, H, N, S)
    if mask is not None:
        keep = keep & mask
    s = s.masked_fill(~keep, -math.inf)
    if sinks is not None:
        sk = sinks.double().view(1, H, 1, 1).expand(B, H, N, 1)
        full = torch.cat([s, sk], -1)
        lse = torch.logsumexp(full, -1)
        p = torch.exp(s - lse.unsqueeze(-1))
    else:
        lse = torch.logsumexp(s, -1)
        fin = torch.isfinite(lse).unsqueeze(-1)
        p = torch.where(fin, torch.exp(s - lse.unsqueeze(-1).masked_fill(~fin, 0)), torch.zeros((), dtype=s.dtype))
    return p @ v, lse


def grad_errs(errs, g, dtype, out_d, ins, rout, rins, names=("dq", "dk", "dv", "dbias")):
    """Adds the gradients' relative errors to errs: a random dout through the call under test
    (out_d, ins on the device) and through the reference (rout, rins in float64). A gradient
    one side does not produce counts as zeros."""
    dout = torch.randn(out_d.shape, generator=g).to(dtype)
    gs = cpu(*torch.autograd.grad(out_d, ins, dout.to(DEV), allow_unused=True))
    rgs = torch.autograd.grad(rout, rins, dout.double(), allow_unused=True)
    for name, a, b, x in zip(names, gs, rgs, rins):
        zero = torch.zeros(x.shape, dtype=torch.float64)
        errs[name] = rel(zero if a is None else a, zero if b is None else b)


def rel(a, b):
    """||a - b|| / ||b||, with ||b|| floored at an RMS of 1e-4: a gradient that is zero in
    exact arithmetic (one visible key, a one-hot softmax) is ~1e-14 in the float64
    reference and ~1e-6 in bf16 kernels, and the ratio of two noises says nothing."""
    a, b = a.double(), b.double()
    floor = 1e-4 * math.sqrt(max(b.numel(), 1))
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), floor))


TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def rint(g, lo, hi):
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def coin(g, pr=0.5):
    return bool(torch.rand(1, generator=g) < pr)


def pick_dtype(g):
    return [torch.float32, torch.bfloat16, torch.float16][rint(g, 0, 2)]


def check(errs, tol):
    """The errors over their limits: tol for outputs, 4 tol for gradients; bias and sinks
    are fp32 whatever q's dtype, so their gradients get at least 1e-6."""
    lim = lambda k: max(4 * tol, 1e-6) if k in ("dbias", "dsinks") else 4 * tol if k.startswith("d") else tol
    return {k: v for k, v in errs.items() if not (v <= lim(k))}


def lse_err(lse, rlse):
    fin = torch.isfinite(rlse)
    if not torch.equal(torch.isfinite(lse), fin):
        return 1.0
    return rel(lse[fin], rlse[fin]) if fin.any() else 0.0


def fuzz_dense(g):
    dtype = [torch.float32, torch.bfloat16, torch.float16, torch.float64][rint(g, 0, 3)]
    Hkv = rint(g, 1, 3)
    H = Hkv * rint(g, 1, 3)
    B = rint(g, 1, 3)
    top = 600 if coin(g, 0.15) else 200  # several query and key tiles on the GPU kernels
    N = rint(g, 1, top)
    S = rint(g, 1, top) if coin(g, 0.6) else N
    D = [rint(g, 1, 40), 64, 128, rint(g, 65, 130), 256][rint(g, 0, 4)]
    Dv = D if coin(g, 0.7) else [rint(g, 1, 40), 64, 96, 128][rint(g, 0, 3)]
    causal = coin(g, 0.4)
    wl = rint(g, -1, 80) if coin(g, 0.3) else -1
    wr = rint(g, -1, 80) if coin(g, 0.3) else -1
    if causal and wr >= 0:
        wr = -1  # window_size with causal: right side 0
    softcap = float(rint(g, 5, 40)) if coin(g, 0.25) else 0.0
    alibi = None
    if coin(g, 0.25):
        alibi = torch.rand(H, generator=g) if coin(g) else torch.rand(B, H, generator=g)
    bias = None
    if coin(g, 0.2):
        shape = [[B, H, N, S], [1, H, N, S], [N, S], [B, 1, 1, S]][rint(g, 0, 3)]
        bias = torch.randn(*shape, generator=g)
    mask = None
    if coin(g, 0.15) and bias is None:
        mask = torch.rand(B, H, N, S, generator=g) < 0.7
    sinks = torch.randn(H, generator=g) if coin(g, 0.15) and bias is None and mask is None else None
    layout = rint(g, 0, 2)  # 0 contiguous BHND, 1 BNHD transposed view, 2 sliced
    scale = None if coin(g, 0.7) else float(torch.rand(1, generator=g)) + 0.05
    grad = coin(g, 0.6) and dtype != torch.float64 or coin(g, 0.3)

    # Inputs scaled by amp: large logits exercise the online softmax's rescaling. Their
    # spread is amp^2 sqrt(D) scale; past ~4 a row with few keys can be near one-hot and its
    # gradients cancel (dS = P (dP - rowsum)): torch's SDPA in the same dtype is as far from
    # float64 there (O(1) relative errors at spread 16 with 2 keys), so those cases check
    # the forward only. In fp32, logits of ~1000 carry rounding of the size of the fp32
    # tolerance: the test suite caps the spread (MAX_SPREAD).
    unit = math.sqrt(D) * (1 / math.sqrt(D) if scale is None else scale)
    amp = min([1.0, 1.0, 4.0, 8.0, 30.0][rint(g, 0, 4)], math.sqrt(MAX_SPREAD / unit))
    if amp * amp * unit > 4:
        grad = False

    def mk(*shape):
        x = torch.randn(*shape, generator=g) * amp
        if layout == 1:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        elif layout == 2:
            x = torch.cat([x, torch.randn(*shape, generator=g)], -1)[..., :shape[-1]]
        return x.to(dtype)

    q, k, v = mk(B, H, N, D), mk(B, Hkv, S, D), mk(B, Hkv, S, Dv)
    ws = None
    if causal or wl >= 0 or wr >= 0:
        ws = (wl, 0 if causal else wr)
    desc = dict(dtype=str(dtype), B=B, H=H, Hkv=Hkv, N=N, S=S, D=D, Dv=Dv, causal=causal, wl=wl, wr=wr,
                softcap=softcap, alibi=None if alibi is None else tuple(alibi.shape),
                bias=None if bias is None else tuple(bias.shape), mask=mask is not None, sinks=sinks is not None,
                layout=layout, scale=scale, grad=grad, amp=amp)
    qq, kk, vv = (dev(t, grad) for t in (q, k, v))
    bb = dev(bias, grad)
    kw = dict(scale=scale, softcap=softcap, alibi_slopes=dev(alibi), attn_bias=bb if bias is not None else dev(mask),
              return_lse=True)
    if causal and ws is None:
        kw["causal"] = True
    elif ws is not None:
        kw["window_size"] = ws
        kw["causal"] = causal
    ss = dev(sinks, grad)
    if sinks is not None:
        kw["sinks"] = ss
    out_d, lse_d = steelattn.flash_attention(qq, kk, vv, **kw)
    out, lse = cpu(out_d, lse_d)
    sc = 1 / math.sqrt(D) if scale is None else scale
    rq, rk, rv = (t.detach().double().requires_grad_(grad) for t in (q, k, v))
    rb = bias.double().requires_grad_(grad) if bias is not None else None
    rs = None if sinks is None else sinks.double().requires_grad_(grad)
    rout, rlse = ref_attention(rq, rk, rv, sc, causal, wl, wr if not causal else -1, softcap, alibi, rb, mask, rs)
    errs = {"out": rel(out.detach(), rout.detach()), "lse": lse_err(lse.detach(), rlse.detach())}
    if grad:
        extra = [(n, a, b) for n, a, b in (("dbias", bb, rb), ("dsinks", ss, rs)) if a is not None]
        grad_errs(errs, g, dtype, out_d, [qq, kk, vv] + [a for _, a, _ in extra], rout,
                  [rq, rk, rv] + [b for _, _, b in extra], ("dq", "dk", "dv") + tuple(n for n, _, _ in extra))
    return desc, errs, check(errs, TOL[dtype])


def fuzz_varlen(g):
    dtype = pick_dtype(g)
    Hkv = rint(g, 1, 3)
    H = Hkv * rint(g, 1, 3)
    ns = rint(g, 1, 6)
    lq = [rint(g, 0, 150) for _ in range(ns)]
    same = coin(g, 0.5)
    lk = list(lq) if same else [rint(g, 0, 150) for _ in range(ns)]
    D = [rint(g, 1, 40), 64, 128, rint(g, 65, 130)][rint(g, 0, 3)]
    Dv = D if coin(g, 0.7) else [16, 64, 96][rint(g, 0, 2)]
    causal = coin(g, 0.5)
    wl = rint(g, 0, 60) if coin(g, 0.3) else -1
    wr = rint(g, 0, 60) if coin(g, 0.3) and not causal else -1
    softcap = float(rint(g, 5, 40)) if coin(g, 0.25) else 0.0
    alibi = None
    if coin(g, 0.25):
        alibi = torch.rand(H, generator=g) if coin(g) else torch.rand(ns, H, generator=g)
    sinks = torch.randn(H, generator=g) if coin(g, 0.2) else None
    grad = coin(g, 0.6)
    tq, tk = sum(lq), sum(lk)
    q = torch.randn(tq, H, D, generator=g).to(dtype)
    k = torch.randn(tk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(tk, Hkv, Dv, generator=g).to(dtype)
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    ck = cq.clone() if same else torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    desc = dict(dtype=str(dtype), H=H, Hkv=Hkv, lq=lq, lk=lk, D=D, Dv=Dv, causal=causal, wl=wl, wr=wr,
                softcap=softcap, alibi=None if alibi is None else tuple(alibi.shape), sinks=sinks is not None,
                grad=grad)
    qq, kk, vv, ss = (dev(t, grad) for t in (q, k, v, sinks))
    kw = dict(causal=causal, softcap=softcap, alibi_slopes=dev(alibi), return_lse=True, sinks=ss)
    if wl >= 0 or wr >= 0:
        kw["window_size"] = (wl, 0 if causal else wr)
    out_d, lse_d = steelattn.flash_attention_varlen(qq, kk, vv, dev(cq), dev(ck), **kw)
    out, lse = cpu(out_d, lse_d)
    rq, rk, rv = (t.double().requires_grad_(grad) for t in (q, k, v))
    rs = None if sinks is None else sinks.double().requires_grad_(grad)
    outs, lses = [], []
    for i in range(ns):
        a, b = int(cq[i]), int(cq[i + 1])
        c, d = int(ck[i]), int(ck[i + 1])
        if b == a:
            continue
        al = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[i])
        if d == c:  # no keys: zeros; lse -inf, or the sink's logit
            outs.append(torch.zeros(b - a, H, Dv, dtype=torch.float64) + 0 * rq[a:b].sum() + 0 * rv.sum())
            lses.append(torch.full((H, b - a), -math.inf, dtype=torch.float64) if rs is None
                        else rs.detach().view(H, 1).expand(H, b - a))
            continue
        o, l = ref_attention(rq[a:b].transpose(0, 1).unsqueeze(0), rk[c:d].transpose(0, 1).unsqueeze(0),
                             rv[c:d].transpose(0, 1).unsqueeze(0), 1 / math.sqrt(D), causal, wl,
                             wr if not causal else -1, softcap, al, None, None, rs)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    rout = torch.cat(outs, 0) if outs else torch.zeros(0, H, Dv, dtype=torch.float64)
    rlse = torch.cat(lses, 1) if lses else torch.zeros(H, 0, dtype=torch.float64)
    errs = {"out": rel(out.detach(), rout.detach()), "lse": lse_err(lse.detach(), rlse.detach())}
    if grad and tq > 0:
        grad_errs(errs, g, dtype, out_d, [qq, kk, vv] + ([ss] if ss is not None else []), rout,
                  [rq, rk, rv] + ([rs] if rs is not None else []), ("dq", "dk", "dv", "dsinks"))
    return desc, errs, check(errs, TOL[dtype])


def fuzz_sparse(g):
    dtype = pick_dtype(g)
    Hkv = rint(g, 1, 2)
    H = Hkv * rint(g, 1, 3)
    B = rint(g, 1, 2)
    N, S = rint(g, 1, 260), rint(g, 1, 260)
    D = [32, 64, 128, rint(g, 1, 40)][rint(g, 0, 3)]
    bq, bk = 16 * rint(g, 1, 10), 16 * rint(g, 1, 10)
    nq, nk = math.ceil(N / bq), math.ceil(S / bk)
    dims = rint(g, 2, 4)
    shape = {2: (nq, nk), 3: (H, nq, nk), 4: (B, H, nq, nk)}[dims]
    blocks = torch.rand(shape, generator=g) < float(torch.rand(1, generator=g))
    causal = coin(g, 0.4)
    wl = rint(g, 0, 80) if coin(g, 0.3) else -1
    softcap = float(rint(g, 5, 40)) if coin(g, 0.25) else 0.0
    grad = coin(g, 0.6)
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    desc = dict(dtype=str(dtype), B=B, H=H, Hkv=Hkv, N=N, S=S, D=D, bs=(bq, bk), dims=dims, causal=causal, wl=wl,
                softcap=softcap, active=float(blocks.float().mean()), grad=grad)
    qq, kk, vv = (dev(t, grad) for t in (q, k, v))
    kw = dict(block_size=(bq, bk), causal=causal, softcap=softcap, return_lse=True)
    if wl >= 0:
        kw["window_size"] = (wl, 0 if causal else -1)
    out_d, lse_d = steelattn.flash_attention_sparse(qq, kk, vv, dev(blocks), **kw)
    out, lse = cpu(out_d, lse_d)
    b4 = blocks.reshape((1,) * (4 - dims) + shape)
    tok = b4.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :N, :S].expand(B, H, N, S)
    rq, rk, rv = (t.double().requires_grad_(grad) for t in (q, k, v))
    rout, rlse = ref_attention(rq, rk, rv, 1 / math.sqrt(D), causal, wl, -1, softcap, None, None, tok)
    errs = {"out": rel(out.detach(), rout.detach()), "lse": lse_err(lse.detach(), rlse.detach())}
    if grad:
        grad_errs(errs, g, dtype, out_d, (qq, kk, vv), rout, (rq, rk, rv))
    return desc, errs, check(errs, TOL[dtype])


def rope_tables(P, rd, g):
    inv = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    ang = torch.arange(P, dtype=torch.float64).unsqueeze(1) * inv.unsqueeze(0)
    return ang.cos().float(), ang.sin().float()


def rot(x, cos, sin, pos, inter, rd):
    """x [H, n, D] float64 at positions pos [n]."""
    c, s = cos[pos].double().unsqueeze(0), sin[pos].double().unsqueeze(0)
    xr = x[..., :rd]
    if inter:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        r_ = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)
    else:
        x1, x2 = xr[..., :rd // 2], xr[..., rd // 2:]
        r_ = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1)
    return torch.cat((r_, x[..., rd:]), -1)


def fuzz_kvcache(g):
    dtype = [torch.float32, torch.bfloat16, torch.float16][rint(g, 0, 2)]
    B = rint(g, 1, 4)
    Hkv = rint(g, 1, 3)
    H = Hkv * rint(g, 1, 4)
    D = [32, 64, 128, 2 * rint(g, 4, 40)][rint(g, 0, 3)]
    Smax = rint(g, 8, 300)
    Nnew = rint(g, 0, min(8, Smax)) if coin(g, 0.7) else 0
    Nq = rint(g, 1, 6) if coin(g, 0.6) else max(1, Nnew)
    lens = [rint(g, 0, Smax - Nnew) for _ in range(B)]
    causal = coin(g, 0.8)
    wl = rint(g, 0, 100) if coin(g, 0.25) else -1
    softcap = float(rint(g, 5, 40)) if coin(g, 0.2) else 0.0
    alibi = torch.rand(H, generator=g) if coin(g, 0.2) else None
    sinks = torch.randn(H, generator=g) if coin(g, 0.2) else None
    paged = coin(g, 0.4)
    use_rope = Nnew > 0 and coin(g, 0.4)
    inter = coin(g)
    rd = D if coin(g) else 2 * rint(g, 1, D // 2)
    kc = torch.randn(B, Hkv, Smax, D, generator=g).to(dtype)
    vc = torch.randn(B, Hkv, Smax, D, generator=g).to(dtype)
    q = torch.randn(B, H, Nq, D, generator=g).to(dtype)
    kn = torch.randn(B, Hkv, Nnew, D, generator=g).to(dtype) if Nnew else None
    vn = torch.randn(B, Hkv, Nnew, D, generator=g).to(dtype) if Nnew else None
    desc = dict(dtype=str(dtype), B=B, H=H, Hkv=Hkv, D=D, Smax=Smax, Nnew=Nnew, Nq=Nq, lens=lens, causal=causal,
                wl=wl, softcap=softcap, alibi=alibi is not None, sinks=sinks is not None, paged=paged,
                rope=(use_rope, inter, rd))
    kc0, vc0 = kc.clone(), vc.clone()
    kw = dict(k_new=dev(kn), v_new=dev(vn), cache_seqlens=dev(torch.tensor(lens, dtype=torch.int32)), causal=causal,
              softcap=softcap, return_lse=True, alibi_slopes=dev(alibi), sinks=dev(sinks))
    if wl >= 0:
        kw["window_size"] = (wl, 0 if causal else -1)
    if use_rope:
        cos, sin = rope_tables(Smax + Nq + 8, rd, g)
        kw.update(rotary_cos=dev(cos), rotary_sin=dev(sin), rotary_interleaved=inter, rotary_dim=rd)
    if paged:
        ps = rint(g, 1, 40)
        per = math.ceil(Smax / ps)
        num_pages = B * per + rint(g, 0, 5)
        perm = torch.randperm(num_pages, generator=g)[:B * per].view(B, per).to(torch.int32)
        kp = torch.randn(num_pages, ps, Hkv, D, generator=g).to(dtype)
        vp = torch.randn(num_pages, ps, Hkv, D, generator=g).to(dtype)
        for b in range(B):
            for j in range(Smax):
                kp[perm[b, j // ps], j % ps] = kc[b, :, j]
                vp[perm[b, j // ps], j % ps] = vc[b, :, j]
        kp_d, vp_d = dev(kp), dev(vp)
        out, lse = cpu(*steelattn.flash_attention_kvcache(dev(q), kp_d, vp_d, block_table=dev(perm), **kw))
        kp, vp = cpu(kp_d, vp_d)
        kcache = torch.stack([torch.stack([kp[perm[b, j // ps], j % ps] for j in range(Smax)], 1) for b in range(B)])
        vcache = torch.stack([torch.stack([vp[perm[b, j // ps], j % ps] for j in range(Smax)], 1) for b in range(B)])
    else:
        kc_d, vc_d = dev(kc), dev(vc)
        out, lse = cpu(*steelattn.flash_attention_kvcache(dev(q), kc_d, vc_d, **kw))
        kc, vc = cpu(kc_d, vc_d)
        kcache, vcache = kc, vc
    errs = {}
    worst_out, worst_lse, worst_cache = 0.0, 0.0, 0.0
    for b in range(B):
        L = lens[b] + Nnew
        qb = q[b].double()
        knb = kn[b].double() if Nnew else None
        if use_rope:
            qpos = torch.arange(Nq) + lens[b] if causal else torch.full((Nq,), lens[b])
            qpos = qpos.clamp(min=0)
            qb = rot(qb, cos, sin, qpos, inter, rd)
            knb = rot(knb, cos, sin, torch.arange(lens[b], lens[b] + Nnew), inter, rd)
        keys = kc0[b, :, :lens[b]].double()
        vals = vc0[b, :, :lens[b]].double()
        if Nnew:
            keys = torch.cat([keys, knb.to(dtype).double()], 1)
            vals = torch.cat([vals, vn[b].double()], 1)
            # the append landed in place
            worst_cache = max(worst_cache, rel(kcache[b, :, lens[b]:L].double(), knb.to(dtype).double()),
                              rel(vcache[b, :, lens[b]:L].double(), vn[b].double()))
        if L == 0:  # no keys: zeros; lse -inf, or the sink's logit
            ro = torch.zeros(H, Nq, D, dtype=torch.float64)
            rl = (torch.full((H, Nq), -math.inf, dtype=torch.float64) if sinks is None
                  else sinks.double().view(H, 1).expand(H, Nq))
        else:
            # causal bottom-right relative to L: query i sees keys j <= i + L - Nq
            i = torch.arange(Nq).view(Nq, 1) + (L - Nq)
            j = torch.arange(L).view(1, L)
            keep = torch.ones(Nq, L, dtype=torch.bool)
            if causal:
                keep &= j <= i
            if wl >= 0:
                keep &= j >= i - wl
            o, l = ref_attention(qb.unsqueeze(0), keys.unsqueeze(0), vals.unsqueeze(0), 1 / math.sqrt(D),
                                 False, -1, -1, softcap, alibi, None, keep.view(1, 1, Nq, L), sinks)
            ro, rl = o[0], l[0]
        worst_out = max(worst_out, rel(out[b].double(), ro) if ro.abs().sum() > 0 else float(out[b].abs().max()))
        worst_lse = max(worst_lse, lse_err(lse[b], rl))
    errs = {"out": worst_out, "lse": worst_lse, "cache": worst_cache}
    tol = TOL[dtype]
    bad = {k: v for k, v in errs.items() if not (v <= (2 * tol if k == "cache" else tol))}
    return desc, errs, bad



def fuzz_sdpa(g):
    """steelattn.scaled_dot_product_attention against torch's, run in float64 on the CPU:
    3-, 4- and 5-dim inputs, bool and float masks of broadcast shapes, is_causal with
    N != S (torch's top-left alignment), scale, enable_gqa, gradients. Rows whose mask hides
    every key are left out of the comparison (torch: NaN, steelattn: zeros, documented)."""
    dtype = pick_dtype(g)
    Hkv = rint(g, 1, 3)
    gqa = coin(g, 0.3)
    H = Hkv * (rint(g, 2, 3) if gqa else 1)
    N, S = rint(g, 1, 150), rint(g, 1, 150)
    D = [rint(g, 1, 40), 64, 128, rint(g, 65, 130)][rint(g, 0, 3)]
    Dv = D if coin(g, 0.7) else [16, 64][rint(g, 0, 1)]
    lead = [(), (rint(g, 1, 3),), (rint(g, 1, 2), rint(g, 1, 2))][rint(g, 0, 2)]
    causal = coin(g, 0.3)
    mask = None
    if not causal and coin(g, 0.5):
        full = lead + (H, N, S)
        shape = [full, (N, S), (1,) * len(lead) + (1, N, S), lead + (1, 1, S), (1, S)][rint(g, 0, 4)]
        mask = torch.rand(shape, generator=g) < 0.8 if coin(g) else torch.randn(shape, generator=g)
    scale = None if coin(g, 0.7) else float(torch.rand(1, generator=g)) + 0.05
    grad = coin(g, 0.5) and (scale is None or math.sqrt(D) * scale <= 4)  # the logit spread (fuzz_dense)
    q = torch.randn(lead + (H, N, D), generator=g).to(dtype)
    k = torch.randn(lead + (Hkv, S, D), generator=g).to(dtype)
    v = torch.randn(lead + (Hkv, S, Dv), generator=g).to(dtype)
    desc = dict(dtype=str(dtype), lead=lead, H=H, Hkv=Hkv, N=N, S=S, D=D, Dv=Dv, causal=causal, gqa=gqa,
                mask=None if mask is None else (str(mask.dtype), tuple(mask.shape)), scale=scale, grad=grad)
    qq, kk, vv = (dev(t, grad) for t in (q, k, v))
    out_d = steelattn.scaled_dot_product_attention(qq, kk, vv, attn_mask=dev(mask), is_causal=causal, scale=scale,
                                                   enable_gqa=gqa)
    rq, rk, rv = (t.double().requires_grad_(grad) for t in (q, k, v))
    rm = mask.double() if mask is not None and mask.is_floating_point() else mask
    rout = torch.nn.functional.scaled_dot_product_attention(rq, rk, rv, attn_mask=rm, is_causal=causal, scale=scale,
                                                            enable_gqa=gqa)
    (out,) = cpu(out_d)
    rows = torch.isfinite(rout).all(-1)  # rows with some visible key
    errs = {"out": rel(out[rows], rout.detach()[rows]) if rows.any() else 0.0}
    if bool((out[~rows] != 0).any()):
        errs["empty_rows"] = 1.0
    if grad and rows.all():
        grad_errs(errs, g, dtype, out_d, (qq, kk, vv), rout, (rq, rk, rv))
    return desc, errs, check(errs, TOL[dtype])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("kinds", nargs="*", default=["dense", "varlen", "sparse", "kvcache", "sdpa"])
    args = ap.parse_args()
    global DEV
    DEV = args.device
    g = torch.Generator().manual_seed(args.seed)
    fns = {"dense": fuzz_dense, "varlen": fuzz_varlen, "sparse": fuzz_sparse, "kvcache": fuzz_kvcache,
           "sdpa": fuzz_sdpa}
    fails = 0
    for c in range(args.count):
        name = args.kinds[c % len(args.kinds)]
        try:
            desc, errs, bad = fns[name](g)
        except Exception as e:  # noqa: BLE001 (a raise on a valid input is a failure too)
            fails += 1
            print("EXC", name, c, type(e).__name__, str(e)[:400])
            traceback.print_exc(limit=3)
            continue
        if bad:
            fails += 1
            print("FAIL", name, c, desc, {k: f"{v:.2e}" for k, v in errs.items()})
    print(f"seed {args.seed} on {DEV}: {args.count} cases {args.kinds}, {fails} failures")
    raise SystemExit(1 if fails else 0)


if __name__ == "__main__":
    main()
