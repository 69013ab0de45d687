"""Benchmarks of the varlen and block-sparse paths (bench.py's --op varlen / sparse),
in the cells issue 9's bar is judged on, against their peers in the same process.

varlen  64 sequences of random length (seed 0, 1..511 tokens, 16384 in all is the
        anchors' cell; --quick uses the same), H16 D128 bf16 causal. Peers: torch's
        `torch.nn.attention.varlen.varlen_attn`, FA4's `flash_attn_varlen_func` when it
        imports; CPU: a smaller cell, no peer.
        Useful FLOPs: the causal pairs of each sequence, 4 * H * D per pair. Beside them,
        steelattn-dense: our dense causal call on 64 equal sequences of the same tokens
        (its own FLOPs): what the cell would cost without ragged lengths.
sparse  video3d: the anchors' video locality mask (16 frames of 32 x 32 patches, N 16384,
        |dt| <= 1 and Chebyshev spatial radius 6, blocks of 128: ~10 % active), also at
        blocks of 64 (video3d-64, off the Hopper kernels' tiles); window512: the causal
        sliding-window-512 block mask at N 4k, 8k and 16k; H16 D128 bf16. Peer:
        FlexAttention (compiled) with the same mask as a BlockMask; steelattn's dense call
        as the (active fraction x dense) yardstick. FLOPs: the active blocks' pairs.
Rows (issue 9): {"op": "varlen" | "sparse", "case": "random64" | "video3d" | "video3d-64" |
"window512", "pass": "fwd" | "fwd_bwd", "impl", "N", "ms", "tflops", "active"} plus bench.py's
other row fields (B = number of sequences for varlen, N = S = total tokens). "active": the
fraction of blocks the mask keeps (sparse), of the packed [total, total] score grid the
sequences' causal pairs cover (varlen). The markdown has a section per op and pass.
"""
from __future__ import annotations

import itertools

import torch

import steelattn

from . import bench as _b


def _varlen_cell(device, quick):
    g = torch.Generator().manual_seed(0)
    if device == "cuda":
        lens = torch.randint(1, 512, (64,), generator=g).tolist()
        H, D, dt = 16, 128, torch.bfloat16
    else:
        lens = torch.randint(1, 256, (8 if quick else 16,), generator=g).tolist()
        H, D, dt = 8, 64, torch.float32
    return lens, H, D, dt


def _varlen_peers(device, cu, max_len, log):
    peers = {}
    if device == "cuda":
        try:
            from torch.nn.attention.varlen import varlen_attn
            peers["torch-varlen"] = lambda q, k, v: varlen_attn(q, k, v, cu, cu, max_len, max_len,
                                                                window_size=(-1, 0))
        except Exception as e:  # torch < 2.11
            log(f"  varlen: torch varlen_attn unavailable: {type(e).__name__}: {e}")
        if _b.fa4_func(log) is not None:
            try:
                from flash_attn.cute.interface import flash_attn_varlen_func

                def fa4(q, k, v):
                    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                                 max_seqlen_k=max_len, causal=True)
                    return out[0] if isinstance(out, (tuple, list)) else out
                peers["fa4"] = fa4
            except Exception as e:
                log(f"  varlen: FA4 varlen unavailable: {type(e).__name__}: {e}")
    return peers


def bench_varlen(device="cpu", quick=False, log=print, run=None):
    run = run or _b._Run(device, log=log)
    n0 = len(run.rows)
    lens, H, D, dt = _varlen_cell(device, quick)
    T = sum(lens)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    fl = sum(4 * H * D * n * (n + 1) // 2 for n in lens)
    g = torch.Generator(device=device).manual_seed(1)
    base = [_b._randn((T, H, D), device, dt, g) for _ in range(3)]
    dout = _b._randn((T, H, D), device, dt, g)
    timer = _b.time_cuda if device == "cuda" else _b.time_cpu
    impls = {"steelattn": lambda q, k, v: steelattn.flash_attention_varlen(q, k, v, cu, cu, causal=True)}
    impls.update(_varlen_peers(device, cu, max(lens), log))
    # The yardstick: our dense causal call on as many equal sequences holding the same tokens
    # (B x T // B of them; its own FLOPs), i.e. what varlen would cost without ragged lengths.
    B, n_eq = len(lens), T // len(lens)
    impls["steelattn-dense"] = lambda q, k, v: steelattn.flash_attention(
        *(t[:B * n_eq].view(B, n_eq, H, D).transpose(1, 2) for t in (q, k, v)), causal=True)
    fl_dense = B * 4 * H * D * n_eq * (n_eq + 1) // 2
    douts = {"steelattn-dense": dout[:B * n_eq].view(B, n_eq, H, D).transpose(1, 2)}
    pairs = sum(n * (n + 1) // 2 for n in lens)
    for pas in ("fwd", "fwd_bwd"):
        if run.out_of_time():
            continue
        res = {}
        for name, fn in impls.items():
            ins = [t.detach().clone().requires_grad_(pas == "fwd_bwd") for t in base]
            step = (lambda fn=fn, ins=ins: fn(*ins)) if pas == "fwd" else \
                (lambda fn=fn, ins=ins, d=douts.get(name, dout): torch.autograd.grad(fn(*ins), ins, d))
            try:
                _b._stats_reset()
                res[name] = timer(step)
                path = _b._stats_read() if name.startswith("steelattn") else None
            except Exception as e:
                log(f"  varlen {pas} {name} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            row = _b._row("varlen", _b._DTNAME[dt], len(lens), H, H, T, T, D, True, None, name, res[name],
                          (fl_dense if name == "steelattn-dense" else fl) * (3.5 if pas == "fwd_bwd" else 1.0))
            row.update({"pass": pas, "case": f"random{len(lens)}", "active": round(pairs / (T * T), 6)})
            if path is not None:
                row["path"] = path
            run.add(row)
        log(f"  varlen {pas}: " + "  ".join(f"{n} {t:.3f} ms" for n, t in res.items()))
        run.flush()
    return run.rows[n0:]


def video_block_mask(frames=16, h=32, w=32, radius=6, dt=1, block=128, device="cpu"):
    """The anchors' video locality mask at block granularity (token order (t, y, x))."""
    return steelattn.make_spatial_3d_mask(h, w, frames, spatial_radius=radius, temporal_radius=dt,
                                          block_size=block, device=device)


def sparse_cases(device):
    """The sparse bench's masks: [(case, N, block mask, block size, causal)]. video3d is the
    anchors' video locality over N = 16 frames x 32 x 32 (CPU: 4 x 16 x 16); video3d-64 the
    same at 64 x 64 blocks, off the Hopper kernels' 128 x 128 tiles (partly active tiles are
    masked per 16 x 16 cell); window512 the causal sliding window of 512 at N 4k, 8k, 16k
    (CPU: 1k, 2k)."""
    frames, side = (16, 32) if device == "cuda" else (4, 16)
    nv = frames * side * side
    cases = [("video3d", nv, video_block_mask(frames, side, side, device=device), 128, False),
             ("video3d-64", nv, video_block_mask(frames, side, side, block=64, device=device), 64, False)]
    for n in (4096, 8192, 16384) if device == "cuda" else (1024, 2048):
        cases.append(("window512", n, steelattn.make_sliding_window_mask(n, 512, causal=True, device=device), 128, True))
    return cases


def bench_sparse(device="cpu", quick=False, log=print, run=None):
    run = run or _b._Run(device, log=log)
    n0 = len(run.rows)
    H, D, dt = (16, 128, torch.bfloat16) if device == "cuda" else (4, 64, torch.float32)
    timer = _b.time_cuda if device == "cuda" else _b.time_cpu
    for case, N, blocks, bs, causal in sparse_cases(device):
        g = torch.Generator(device=device).manual_seed(2)
        base = [_b._randn((1, H, N, D), device, dt, g) for _ in range(3)]
        dout = _b._randn((1, H, N, D), device, dt, g)
        token = steelattn.sparse.token_mask(blocks, bs, bs, N, N)
        if causal:
            token = token & torch.ones(N, N, dtype=torch.bool, device=device).tril()
        pairs = int(token.sum())
        fl = 4 * H * D * pairs
        impls = {"steelattn": lambda q, k, v, b=blocks, c=causal, bs=bs: steelattn.flash_attention_sparse(
            q, k, v, b, block_size=bs, causal=c),
            "steelattn-dense": lambda q, k, v, c=causal: steelattn.flash_attention(q, k, v, causal=c)}
        if device == "cuda":
            try:
                flex = _flex_block_fn(blocks, causal, N, bs)
                impls["flex"] = flex
            except Exception as e:
                log(f"  sparse {case}: FlexAttention unavailable: {type(e).__name__}: {str(e)[:160]}")
        active = round(float(blocks.float().mean()), 6)
        for pas in ("fwd", "fwd_bwd"):
            if run.out_of_time():
                continue
            res = {}
            for name, fn in impls.items():
                ins = [t.detach().clone().requires_grad_(pas == "fwd_bwd") for t in base]
                step = (lambda fn=fn, ins=ins: fn(*ins)) if pas == "fwd" else \
                    (lambda fn=fn, ins=ins: torch.autograd.grad(fn(*ins), ins, dout))
                try:
                    _b._stats_reset()
                    res[name] = timer(step)
                    path = _b._stats_read() if name.startswith("steelattn") else None
                except Exception as e:
                    log(f"  sparse {pas} {case} N {N} {name} failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                row = _b._row("sparse", _b._DTNAME[dt], 1, H, H, N, N, D, causal, None, name, res[name],
                              fl * (3.5 if pas == "fwd_bwd" else 1.0))
                row.update({"pass": pas, "case": case, "active": active})
                if path is not None:
                    row["path"] = path
                run.add(row)
            log(f"  sparse {pas} {case} N {N}: " + "  ".join(f"{n} {t:.3f} ms" for n, t in res.items()))
            run.flush()
    return run.rows[n0:]


def _flex_block_fn(blocks, causal, N, bs=128):
    """FlexAttention (compiled) with `blocks` (bs x bs blocks) as its BlockMask (Flex's own
    blocks are 128 x 128: at other sizes its mask_mod decides inside partial blocks)."""
    from torch.nn.attention.flex_attention import create_block_mask

    _b._flex_fns(N, False, None)  # compiles flex_attention once, raises the recompile limits
    dev = blocks.device

    def mask_mod(b, h, qi, ki):
        keep = blocks[qi // bs, ki // bs]
        return keep & (qi >= ki) if causal else keep
    bm = create_block_mask(mask_mod, None, None, N, N, device=dev)
    return lambda q, k, v: _b._flex_compiled(q, k, v, block_mask=bm)
