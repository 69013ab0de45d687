"""Paged decode against dense by pool layout (issue 10: paged within 5% of dense). The
bench's pools are slot-major, [num_pages, page, Hkv, D] stored as such, so one KV head's
rows of a page lie Hkv * D * 2 bytes apart (2 KB at Hkv 8, D 128); a head-major pool stores
[num_pages, Hkv, page, D] and passes the same shape as a transposed view, so a head's rows
of a page are contiguous. Pages are shuffled in both. CUDA-graph replays, L2 flushed (triton
do_bench), N=1, H32/8 D128 bf16. Usage (GPU machine): python3 scripts/decode-paged-layout.py
[--once: one call each of dense, page-16 slot-major and head-major at B8 S32k, for ncu]"""
import sys

import torch
from triton.testing import do_bench

import steelattn
from steelattn import bench

H, Hkv, D = 32, 8, 128


def pool(t, page, head_major, perm):
    B, _, S, _ = t.shape
    P = S // page
    if head_major:  # storage [B * P, Hkv, page, D], passed as [B * P, page, Hkv, D]
        p = t.view(B, Hkv, P, page, D).permute(0, 2, 1, 3, 4).reshape(B * P, Hkv, page, D)
        out = torch.empty_like(p)
        out[perm] = p
        return out.transpose(1, 2)
    p = t.view(B, Hkv, P, page, D).permute(0, 2, 3, 1, 4).reshape(B * P, page, Hkv, D).contiguous()
    out = torch.empty_like(p)
    out[perm] = p
    return out


once = "--once" in sys.argv
for B, S in ((8, 32768),) if once else ((1, 32768), (8, 32768), (64, 4096), (128, 2048)):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    gb = 2 * B * Hkv * S * D * 2 / 1e3
    ref = steelattn.flash_attention(q, k, v)
    lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
    if once:
        for head_major in (False, True):
            perm = torch.randperm(B * S // 16, generator=torch.Generator().manual_seed(16))
            table = perm.view(B, -1).to(device="cuda", dtype=torch.int32)
            pk, pv = pool(k, 16, head_major, perm.cuda()), pool(v, 16, head_major, perm.cuda())
            steelattn.flash_attention_kvcache(q, pk, pv, block_table=table, cache_seqlens=lens, causal=False)
        torch.cuda.synchronize()
        break
    t = {"dense": do_bench(bench._graphed(lambda: steelattn.flash_attention(q, k, v)), rep=200) * 1e3}
    for page in (16, 64):
        P = S // page
        table = torch.randperm(B * P, generator=torch.Generator().manual_seed(page)).view(B, P)
        perm = table.view(-1).long().cuda()
        table = table.to(device="cuda", dtype=torch.int32)
        for head_major in (False, True):
            pk, pv = pool(k, page, head_major, perm), pool(v, page, head_major, perm)
            fn = lambda: steelattn.flash_attention_kvcache(q, pk, pv, block_table=table, cache_seqlens=lens,  # noqa: E731
                                                           causal=False)
            torch.testing.assert_close(fn(), ref, atol=2e-2, rtol=2e-2)
            t[f"page{page}-{'head' if head_major else 'slot'}-major"] = do_bench(bench._graphed(fn), rep=200) * 1e3
            del pk, pv
    print(f"B{B} S{S}: " + "  ".join(f"{n} {x:.1f} us ({gb / x:.0f} GB/s, {t['dense'] / x:.2f}x dense)"
                                     for n, x in t.items()), flush=True)
print(steelattn.get_dispatch_stats())
