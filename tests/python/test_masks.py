"""Mask builders (steelattn.masks): every block mask is the exact "any" reduction of a
dense token-level rule written here from the docstrings (independently of the builders'
block arithmetic), on odd sizes and several block sizes; bad arguments raise ValueError
naming the argument; large shapes are built quickly without an N x N tensor.

The module under test is the repository's python/steelattn/masks.py (it needs only
torch), so this file runs without rebuilding the installed package."""
import ast
import doctest
import importlib.util
import math
import os
import re
import resource
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch

_SRC = Path(__file__).resolve().parents[2] / "python" / "steelattn" / "masks.py"
if _SRC.exists():
    _spec = importlib.util.spec_from_file_location("steelattn_masks_under_test", _SRC)
    M = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(M)
else:  # an installed package without the source tree
    from steelattn import masks as M

BLOCKS = [16, 64, (32, 48), 128]
BUILDERS = sorted(M.__all__)


def pair(bs):
    return (bs, bs) if isinstance(bs, int) else bs


def reduce_any(tok, bs):
    """[.., N, S] token mask -> [.., ceil(N/bq), ceil(S/bk)]: a block is active iff any pair is."""
    bq, bk = pair(bs)
    n, s = tok.shape[-2:]
    nq, nk = -(-n // bq), -(-s // bk)
    pad = torch.zeros(*tok.shape[:-2], nq * bq, nk * bk, dtype=torch.bool)
    pad[..., :n, :s] = tok
    return pad.unflatten(-1, (nk, bk)).unflatten(-3, (nq, bq)).any(-1).any(-2)


def odd_size(g, lo, hi):
    """A random size in [lo, hi] that no block size here divides."""
    while True:
        n = int(torch.randint(lo, hi + 1, (), generator=g))
        if n % 16:
            return n


def odd_grid(g, max_tokens, max_frames=5, min_frames=1):
    while True:
        t = int(torch.randint(min_frames, max_frames + 1, (), generator=g))
        h = int(torch.randint(1, 24, (), generator=g))
        w = int(torch.randint(1, 24, (), generator=g))
        if (t * h * w) % 16 and t * h * w <= max_tokens:
            return t, h, w


def rint(g, lo, hi):
    return int(torch.randint(lo, hi + 1, (), generator=g))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The builders' tensors are small ([NQ, NK] with NQ ~ 500): on a 2-core machine that
    is busy elsewhere, intra-op threads mostly wait for each other, so time on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def g():
    seed = torch.randint(0, 2**31 - 1, ()).item()
    print(f"generator seed {seed}")
    return torch.Generator().manual_seed(seed)


def check(builder, tok, **kwargs):
    """The builder's block masks equal the any-reduction of `tok` for every block size, and
    its token_level output equals `tok`."""
    for bs in BLOCKS:
        got = builder(block_size=bs, **kwargs)
        want = reduce_any(tok, bs)
        assert got.dtype == torch.bool and got.shape == want.shape, (bs, got.shape, want.shape)
        assert torch.equal(got, want), f"block_size={bs} {kwargs}: {(got != want).nonzero()[:5].tolist()}"
    assert torch.equal(builder(token_level=True, **kwargs), tok), kwargs


# ------------------------------------------------------------ token-level rules

def ij(n, s):
    return torch.arange(n)[:, None], torch.arange(s)[None, :]


def tok_window(n, s, left, right):
    """i' = i + s - n; i' - left <= j <= i' + right; None = unbounded."""
    i, j = ij(n, s)
    ip = i + s - n
    ok = torch.ones(n, s, dtype=torch.bool)
    if left is not None:
        ok &= j >= ip - left
    if right is not None:
        ok &= j <= ip + right
    return ok


def window_sides(window_size, causal):
    if isinstance(window_size, tuple):
        left, right = (None if w == -1 else w for w in window_size)
    else:
        left = right = window_size
    return left, (0 if causal else right)


def video_coords(t, h, w):
    n = torch.arange(t * h * w)
    return n // (h * w), (n // w) % h, n % w


def segment_ids(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def tok_segments(lq, lk, causal):
    sq, sk = segment_ids(lq), segment_ids(lk)
    ok = sq[:, None] == sk[None, :]
    if causal:
        startq = torch.tensor([0] + lq).cumsum(0)
        startk = torch.tensor([0] + lk).cumsum(0)
        p = torch.arange(sum(lq)) - startq[sq]
        r = torch.arange(sum(lk)) - startk[sk]
        off = torch.tensor(lk)[sq] - torch.tensor(lq)[sq]  # per query's segment
        ok &= r[None, :] <= (p + off)[:, None]
    return ok


def random_lengths(g, max_total):
    while True:
        count = rint(g, 1, 6)
        lengths = [rint(g, 0, max_total // count) for _ in range(count)]
        if sum(lengths) % 16 and sum(lengths) > 0:
            return lengths


# ------------------------------------------------------------------- 1-D rules

def test_causal_block_mask(g):
    for _ in range(3):
        n = odd_size(g, 1, 600)
        s = odd_size(g, 1, 600)
        check(M.make_causal_block_mask, tok_window(n, n, None, 0), seq_len=n)
        check(M.make_causal_block_mask, tok_window(n, s, None, 0), seq_len=n, seq_len_k=s)


def test_causal_block_mask_is_lower_triangle():
    m = M.make_causal_block_mask(1000, block_size=64)
    assert torch.equal(m, torch.ones(16, 16, dtype=torch.bool).tril())


def test_sliding_window_mask(g):
    for _ in range(3):
        n, s = odd_size(g, 1, 600), odd_size(g, 1, 600)
        w = rint(g, 0, 200)
        windows = [w, (rint(g, -1, 150), rint(g, -1, 150)), (-1, -1), 0]
        for window_size in windows:
            for causal in (False, True):
                left, right = window_sides(window_size, causal)
                check(M.make_sliding_window_mask, tok_window(n, n, left, right), seq_len=n,
                      window_size=window_size, causal=causal)
                check(M.make_sliding_window_mask, tok_window(n, s, left, right), seq_len=n, seq_len_k=s,
                      window_size=window_size, causal=causal)


def test_sliding_window_int_semantics():
    # causal window w: query i sees i - w <= j <= i (w + 1 keys)
    tok = M.make_sliding_window_mask(40, 5, block_size=16, causal=True, token_level=True)
    assert tok[20].nonzero().flatten().tolist() == [15, 16, 17, 18, 19, 20]
    tok = M.make_sliding_window_mask(40, 5, block_size=16, token_level=True)
    assert tok[20].nonzero().flatten().tolist() == list(range(15, 26))


def test_sink_window_mask(g):
    for _ in range(3):
        n, s = odd_size(g, 1, 600), odd_size(g, 1, 600)
        w, sinks = rint(g, 0, 150), rint(g, 0, 40)
        for causal in (True, False):
            for window_size in (w, (w, rint(g, 0, 30))):
                for nn_, ss in ((n, n), (n, s)):
                    left, right = window_sides(window_size, causal)
                    i, j = ij(nn_, ss)
                    ip = i + ss - nn_
                    sink = j < sinks
                    if causal:
                        sink = sink & (j <= ip)
                    tok = tok_window(nn_, ss, left, right) | sink
                    check(M.make_sink_window_mask, tok, seq_len=nn_, seq_len_k=ss, window_size=window_size,
                          num_sink_tokens=sinks, causal=causal)


# ------------------------------------------------------------------ segments

def test_segment_masks(g):
    for _ in range(4):
        lq = random_lengths(g, 500)
        lk = random_lengths(g, 500)
        while len(lk) != len(lq):
            lk = random_lengths(g, 500)
        for causal, builder in ((False, M.make_segment_mask), (True, M.make_causal_segment_mask)):
            check(builder, tok_segments(lq, lq, causal), segment_lengths=lq)
            check(builder, tok_segments(lq, lk, causal), segment_lengths=lq, segment_lengths_k=lk)
            # a tensor of lengths gives the same mask
            got = builder(torch.tensor(lq), block_size=64, segment_lengths_k=torch.tensor(lk))
            assert torch.equal(got, reduce_any(tok_segments(lq, lk, causal), 64))


def test_segment_zero_lengths():
    lq, lk = [17, 0, 40, 0, 9], [0, 33, 21, 5, 0]
    for causal, builder in ((False, M.make_segment_mask), (True, M.make_causal_segment_mask)):
        check(builder, tok_segments(lq, lk, causal), segment_lengths=lq, segment_lengths_k=lk)


# --------------------------------------------------------------- image / video

def test_spatial_2d_mask(g):
    for _ in range(3):
        _, h, w = odd_grid(g, 600, max_frames=1)
        r = rint(g, 0, 5)
        yx = torch.arange(h * w)
        y, x = yx // w, yx % w
        dy, dx = (y[:, None] - y[None, :]).abs(), (x[:, None] - x[None, :]).abs()
        check(M.make_spatial_2d_mask, torch.maximum(dy, dx) <= r, height=h, width=w, spatial_radius=r)
        ry, rx = rint(g, 0, 4), rint(g, 0, 4)
        check(M.make_spatial_2d_mask, (dy <= ry) & (dx <= rx), height=h, width=w, spatial_radius=(ry, rx))
    # patch_size: height and width in pixels, radius in patches
    p = 4
    y, x = torch.arange(9 * 7) // 7, torch.arange(9 * 7) % 7
    tok = ((y[:, None] - y[None, :]).abs() <= 2) & ((x[:, None] - x[None, :]).abs() <= 2)
    check(M.make_spatial_2d_mask, tok, height=9 * p, width=7 * p, spatial_radius=2, patch_size=p)


def test_spatial_3d_mask(g):
    for _ in range(4):
        T, h, w = odd_grid(g, 700)
        rt, rs = rint(g, 0, 2), rint(g, 0, 4)
        t, y, x = video_coords(T, h, w)
        d = lambda c: (c[:, None] - c[None, :]).abs()  # noqa: E731
        tok = (d(t) <= rt) & (d(y) <= rs) & (d(x) <= rs)
        check(M.make_spatial_3d_mask, tok, height=h, width=w, num_frames=T, spatial_radius=rs, temporal_radius=rt)
        ry, rx = rint(g, 0, 3), rint(g, 0, 3)
        tok = (d(t) <= rt) & (d(y) <= ry) & (d(x) <= rx)
        check(M.make_spatial_3d_mask, tok, height=h, width=w, num_frames=T, spatial_radius=(ry, rx),
              temporal_radius=rt)


def test_axial_masks(g):
    for _ in range(3):
        T, h, w = odd_grid(g, 700)
        t, y, x = video_coords(T, h, w)
        d = lambda c: c[None, :] - c[:, None]  # noqa: E731  key minus query
        check(M.make_axial_spatial_mask, d(t) == 0, height=h, width=w, num_frames=T)
        r = rint(g, 0, 4)
        tok = (d(t) == 0) & (d(y).abs() <= r) & (d(x).abs() <= r)
        check(M.make_axial_spatial_mask, tok, height=h, width=w, num_frames=T, spatial_radius=r)
        same_pos = (d(y) == 0) & (d(x) == 0)
        check(M.make_axial_temporal_mask, same_pos, height=h, width=w, num_frames=T)
        check(M.make_axial_temporal_mask, same_pos & (d(t) <= 0), height=h, width=w, num_frames=T, causal=True)
        rt = rint(g, 0, 3)
        check(M.make_axial_temporal_mask, same_pos & (d(t).abs() <= rt), height=h, width=w, num_frames=T,
              temporal_radius=rt)
        check(M.make_axial_temporal_mask, same_pos & (d(t) <= 0) & (d(t) >= -rt), height=h, width=w,
              num_frames=T, temporal_radius=rt, causal=True)


def test_dilated_temporal_mask(g):
    for _ in range(4):
        T, h, w = odd_grid(g, 700, max_frames=12, min_frames=4)
        rate, lw = rint(g, 1, 5), rint(g, 0, 2)
        t, _, _ = video_coords(T, h, w)
        dt = t[None, :] - t[:, None]
        tok = (dt.abs() <= lw) | (dt % rate == 0)
        check(M.make_dilated_temporal_mask, tok, height=h, width=w, num_frames=T, dilation_rate=rate,
              local_window=lw)
        check(M.make_dilated_temporal_mask, tok & (dt <= 0), height=h, width=w, num_frames=T, dilation_rate=rate,
              local_window=lw, causal=True)


def test_reference_frame_mask(g):
    for _ in range(3):
        T, h, w = odd_grid(g, 700, max_frames=10, min_frames=3)
        refs = sorted({rint(g, 0, T - 1) for _ in range(rint(g, 0, 3))})
        lw = rint(g, 0, 2)
        t, _, _ = video_coords(T, h, w)
        is_ref = torch.isin(t, torch.tensor(refs, dtype=torch.int64))
        tok = is_ref[None, :] | ((t[:, None] - t[None, :]).abs() <= lw)
        check(M.make_reference_frame_mask, tok, height=h, width=w, num_frames=T, reference_frames=refs,
              local_window=lw)
        got = M.make_reference_frame_mask(h, w, T, torch.tensor(refs, dtype=torch.int64), 64, local_window=lw)
        assert torch.equal(got, reduce_any(tok, 64))


def test_adaptive_window_mask(g):
    for _ in range(4):
        T, h, w = odd_grid(g, 700, max_frames=6)
        bh, bw, bt = rint(g, 1, 6), rint(g, 1, 6), rint(g, 1, 3)
        train = (rint(g, 64, 512), rint(g, 64, 512))
        inf = (rint(g, 64, 1024), rint(g, 64, 1024))
        wh = min(max(math.ceil(Fraction(bh * inf[0], train[0])), 1), h)
        ww = min(max(math.ceil(Fraction(bw * inf[1], train[1])), 1), w)
        wt = min(bt, T)
        t, y, x = video_coords(T, h, w)
        for shifted in (False, True):
            o = (wt // 2, wh // 2, ww // 2) if shifted else (0, 0, 0)
            win = [(t + o[0]) // wt, (y + o[1]) // wh, (x + o[2]) // ww]
            tok = torch.ones(len(t), len(t), dtype=torch.bool)
            for c in win:
                tok &= c[:, None] == c[None, :]
            check(M.make_adaptive_window_mask, tok, height=h, width=w, num_frames=T, base_window_h=bh,
                  base_window_w=bw, base_window_t=bt, train_resolution=train, inference_resolution=inf,
                  shifted=shifted)


# ---------------------------------------------------------------- cross stream

def test_cross_stream_mask(g):
    for _ in range(3):
        nq, nk = odd_size(g, 1, 600), odd_size(g, 1, 300)
        check(M.make_cross_stream_mask, torch.ones(nq, nk, dtype=torch.bool), n_tokens_q=nq, n_tokens_kv=nk)
        f = rint(g, 1, min(nq, nk, 12))
        r = rint(g, 0, 2)
        i, j = ij(nq, nk)
        tok = ((i * f) // nq - (j * f) // nk).abs() <= r
        check(M.make_cross_stream_mask, tok, n_tokens_q=nq, n_tokens_kv=nk, pattern="temporal", num_frames=f,
              temporal_radius=r)
        lq = random_lengths(g, 500)
        lk = random_lengths(g, 300)
        while len(lk) != len(lq):
            lk = random_lengths(g, 300)
        check(M.make_cross_stream_mask, tok_segments(lq, lk, False), n_tokens_q=sum(lq), n_tokens_kv=sum(lk),
              pattern="segment", segment_lengths_q=lq, segment_lengths_kv=lk)


# ------------------------------------------------------------- data dependent

def pooled_scores(q, k, bs):
    """float64 block-mean scores [.., NQ, NK], k's heads repeated for GQA."""
    bq, bk = pair(bs)
    if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)

    def pool(x, b):
        return torch.stack([x[..., s:s + b, :].double().mean(-2) for s in range(0, x.shape[-2], b)], -2)
    return pool(q, bq) @ pool(k, bk).transpose(-1, -2)


def check_topk(sel, scores, cand, top_k):
    """sel keeps min(top_k, #candidates) candidates per row, none scoring below an unkept one."""
    cand = cand.expand_as(sel)
    assert not (sel & ~cand).any()
    assert torch.equal(sel.sum(-1), cand.sum(-1).clamp(max=top_k))
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    worst_kept = torch.where(sel, scores, inf).amin(-1)
    best_left = torch.where(cand & ~sel, scores, -inf).amax(-1)
    tol = 1e-4 * scores.abs().amax().clamp(min=1)
    assert (worst_kept >= best_left - tol).all()


def random_qk(g, shape_q, shape_k):
    return torch.randn(*shape_q, generator=g), torch.randn(*shape_k, generator=g)


def test_topk_spatial_mask(g):
    for shape in ([], [3], [2, 4]):
        n, s, d = odd_size(g, 1, 500), odd_size(g, 1, 500), 8
        shape_k = shape[:-1] + [1] if len(shape) == 2 else shape  # GQA in the 4-D case
        q, k = random_qk(g, shape + [n, d], shape_k + [s, d])
        top_k = rint(g, 1, 6)
        for bs in BLOCKS:
            for causal in (False, True):
                sel = M.make_topk_spatial_mask(q, k, top_k, bs, causal=causal)
                nq, nk = -(-n // pair(bs)[0]), -(-s // pair(bs)[1])
                assert sel.shape == tuple(shape) + (nq, nk) and sel.dtype == torch.bool
                causal_tok = tok_window(n, s, None, 0)
                cand = reduce_any(causal_tok, bs) if causal else torch.ones(nq, nk, dtype=torch.bool)
                check_topk(sel, pooled_scores(q, k, bs), cand, top_k)
                tok = M.make_topk_spatial_mask(q, k, top_k, bs, causal=causal, token_level=True)
                want = sel.repeat_interleave(pair(bs)[0], -2)[..., :n, :].repeat_interleave(pair(bs)[1], -1)[..., :s]
                if causal:
                    want = want & causal_tok
                assert torch.equal(tok, want)
                assert torch.equal(reduce_any(tok, bs), sel)


def test_topk_ties_go_to_lower_blocks():
    q, k = torch.randn(100, 16), torch.zeros(300, 16)
    sel = M.make_topk_spatial_mask(q, k, 3, 32)
    assert sel.nonzero()[:, 1].view(-1, 3).tolist() == [[0, 1, 2]] * 4


def test_lcsa_mask(g):
    for shape in ([], [2], [1, 4]):
        T, h, w = odd_grid(g, 500, max_frames=3)
        n, d = T * h * w, 8
        shape_k = shape[:-1] + [2] if len(shape) == 2 else shape
        q, k = random_qk(g, shape + [n, d], shape_k + [n, d])
        r, top_k = rint(g, 0, 4), rint(g, 1, 5)
        rt = [None, rint(g, 0, 1)][rint(g, 0, 1)]
        t, y, x = video_coords(T, h, w)
        dd = lambda c: (c[:, None] - c[None, :]).abs()  # noqa: E731
        struct = (dd(y) <= r) & (dd(x) <= r)
        if rt is not None:
            struct &= dd(t) <= rt
        for bs in BLOCKS:
            sel = M.make_lcsa_mask(q, k, h, w, r, top_k, bs, num_frames=T, temporal_radius=rt)
            cand = reduce_any(struct, bs)
            check_topk(sel, pooled_scores(q, k, bs), cand, top_k)
            tok = M.make_lcsa_mask(q, k, h, w, r, top_k, bs, num_frames=T, temporal_radius=rt, token_level=True)
            bq, bk = pair(bs)
            want = sel.repeat_interleave(bq, -2)[..., :n, :].repeat_interleave(bk, -1)[..., :n] & struct
            assert torch.equal(tok, want)
            # the block mask is the any-reduction of the token mask
            assert torch.equal(reduce_any(tok, bs), sel)


# ---------------------------------------------------------------- bad input

BAD = [
    (lambda: M.make_causal_block_mask(100, block_size=24), "block_size"),
    (lambda: M.make_causal_block_mask(100, block_size=(16, 0)), "block_size"),
    (lambda: M.make_causal_block_mask(100, block_size=(16, 40)), "block_size"),
    (lambda: M.make_causal_block_mask(100, block_size=-16), "block_size"),
    (lambda: M.make_causal_block_mask(100, block_size=16.0), "block_size"),
    (lambda: M.make_causal_block_mask(100, block_size=(16, 16, 16)), "block_size"),
    (lambda: M.make_causal_block_mask(0), "seq_len"),
    (lambda: M.make_causal_block_mask(10.5), "seq_len"),
    (lambda: M.make_causal_block_mask(10, seq_len_k=0), "seq_len_k"),
    (lambda: M.make_sliding_window_mask(100, -2), "window_size"),
    (lambda: M.make_sliding_window_mask(100, (3, -2)), "window_size"),
    (lambda: M.make_sliding_window_mask(100, (1, 2, 3)), "window_size"),
    (lambda: M.make_sliding_window_mask(100, 2.5), "window_size"),
    (lambda: M.make_sliding_window_mask(100, 4, block_size=8), "block_size"),
    (lambda: M.make_sink_window_mask(100, 10, -1), "num_sink_tokens"),
    (lambda: M.make_segment_mask([3, -1]), "segment_lengths"),
    (lambda: M.make_segment_mask([]), "segment_lengths"),
    (lambda: M.make_segment_mask([0, 0]), "segment_lengths"),
    (lambda: M.make_segment_mask(torch.tensor([1.0, 2.0])), "segment_lengths"),
    (lambda: M.make_segment_mask(7), "segment_lengths"),
    (lambda: M.make_causal_segment_mask([3, 4], segment_lengths_k=[3]), "segment_lengths_k"),
    (lambda: M.make_causal_segment_mask([3, 4], block_size=100), "block_size"),
    (lambda: M.make_spatial_2d_mask(0, 4, 1), "height"),
    (lambda: M.make_spatial_2d_mask(4, 4, -1), "spatial_radius"),
    (lambda: M.make_spatial_2d_mask(10, 10, 1, patch_size=3), "patch_size"),
    (lambda: M.make_spatial_3d_mask(4, 4, 0, 1, 1), "num_frames"),
    (lambda: M.make_spatial_3d_mask(4, 4, 2, 1, -1), "temporal_radius"),
    (lambda: M.make_axial_spatial_mask(4, 0, 2), "width"),
    (lambda: M.make_axial_spatial_mask(4, 4, 2, spatial_radius=(1, -1)), "spatial_radius"),
    (lambda: M.make_axial_temporal_mask(4, 4, 2, temporal_radius=-1), "temporal_radius"),
    (lambda: M.make_dilated_temporal_mask(4, 4, 8, 0, 1), "dilation_rate"),
    (lambda: M.make_dilated_temporal_mask(4, 4, 8, 2, -1), "local_window"),
    (lambda: M.make_reference_frame_mask(4, 4, 3, [5]), "reference_frames"),
    (lambda: M.make_reference_frame_mask(4, 4, 3, [-1]), "reference_frames"),
    (lambda: M.make_reference_frame_mask(4, 4, 3, "0"), "reference_frames"),
    (lambda: M.make_reference_frame_mask(4, 4, 3, [0], local_window=-1), "local_window"),
    (lambda: M.make_adaptive_window_mask(8, 8, 2, 0, 4, 1, 256, 512), "base_window_h"),
    (lambda: M.make_adaptive_window_mask(8, 8, 2, 4, 4, 0, 256, 512), "base_window_t"),
    (lambda: M.make_adaptive_window_mask(8, 8, 2, 4, 4, 1, (0, 256), 512), "train_resolution"),
    (lambda: M.make_adaptive_window_mask(8, 8, 2, 4, 4, 1, 256, (1, 2, 3)), "inference_resolution"),
    (lambda: M.make_cross_stream_mask(0, 10), "n_tokens_q"),
    (lambda: M.make_cross_stream_mask(10, 0), "n_tokens_kv"),
    (lambda: M.make_cross_stream_mask(10, 10, pattern="diagonal"), "pattern"),
    (lambda: M.make_cross_stream_mask(10, 10, pattern="temporal"), "num_frames"),
    (lambda: M.make_cross_stream_mask(10, 5, pattern="temporal", num_frames=6), "num_frames"),
    (lambda: M.make_cross_stream_mask(10, 5, pattern="temporal", num_frames=2, temporal_radius=-1),
     "temporal_radius"),
    (lambda: M.make_cross_stream_mask(10, 5, pattern="segment"), "segment_lengths_q"),
    (lambda: M.make_cross_stream_mask(10, 5, pattern="segment", segment_lengths_q=[5, 4],
                                      segment_lengths_kv=[2, 3]), "segment_lengths_q"),
    (lambda: M.make_cross_stream_mask(10, 5, pattern="segment", segment_lengths_q=[5, 5],
                                      segment_lengths_kv=[2, 3, 0]), "segment_lengths_kv"),
    (lambda: M.make_topk_spatial_mask(torch.ones(10, 4, dtype=torch.int32), torch.ones(10, 4), 2), "q"),
    (lambda: M.make_topk_spatial_mask(torch.ones(10, 4), torch.ones(2, 10, 4), 2), "k"),
    (lambda: M.make_topk_spatial_mask(torch.ones(3, 10, 4), torch.ones(2, 10, 4), 2), "k"),
    (lambda: M.make_topk_spatial_mask(torch.ones(1, 10, 4), torch.ones(1, 10, 5), 2), "k"),
    (lambda: M.make_topk_spatial_mask(torch.ones(2, 1, 10, 4), torch.ones(1, 1, 10, 4), 2), "k"),
    (lambda: M.make_topk_spatial_mask(torch.ones(10, 4), torch.ones(10, 4), 0), "top_k"),
    (lambda: M.make_topk_spatial_mask(torch.ones(10, 4), torch.ones(10, 4), 2, block_size=(16, 20)),
     "block_size"),
    (lambda: M.make_lcsa_mask(torch.ones(30, 4), torch.ones(30, 4), 5, 5, 1, 2), "num_frames"),
    (lambda: M.make_lcsa_mask(torch.ones(25, 4), torch.ones(25, 4), 5, 5, -1, 2), "spatial_radius"),
    (lambda: M.make_lcsa_mask(torch.ones(25, 4), torch.ones(25, 4), 5, 5, 1, 0), "top_k"),
]


@pytest.mark.parametrize("call,name", BAD, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD)])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"\b{re.escape(name)}\b"):
        call()


# ----------------------------------------------------------- large, fast, lean

N_LARGE = 65536
LARGE = {
    "make_causal_block_mask": lambda: M.make_causal_block_mask(N_LARGE),
    "make_sliding_window_mask": lambda: M.make_sliding_window_mask(N_LARGE, 512, causal=True),
    "make_sink_window_mask": lambda: M.make_sink_window_mask(N_LARGE, 512, 4),
    "make_segment_mask": lambda: M.make_segment_mask([1000 + 37 * i for i in range(55)]),
    "make_causal_segment_mask": lambda: M.make_causal_segment_mask([1000 + 37 * i for i in range(55)]),
    "make_spatial_2d_mask": lambda: M.make_spatial_2d_mask(256, 256, 6),
    "make_spatial_3d_mask": lambda: M.make_spatial_3d_mask(32, 32, 64, 6, 1),
    "make_axial_spatial_mask": lambda: M.make_axial_spatial_mask(32, 32, 64, spatial_radius=4),
    "make_axial_temporal_mask": lambda: M.make_axial_temporal_mask(32, 32, 64, temporal_radius=4, causal=True),
    "make_dilated_temporal_mask": lambda: M.make_dilated_temporal_mask(32, 32, 64, 4, 1),
    "make_reference_frame_mask": lambda: M.make_reference_frame_mask(32, 32, 64, [0, 31]),
    "make_adaptive_window_mask": lambda: M.make_adaptive_window_mask(32, 32, 64, 8, 8, 2, 256, 512, shifted=True),
    "make_cross_stream_mask": lambda: M.make_cross_stream_mask(N_LARGE, N_LARGE // 8, pattern="temporal",
                                                               num_frames=64),
    "make_topk_spatial_mask": lambda q, k: M.make_topk_spatial_mask(q, k, 16, causal=True),
    "make_lcsa_mask": lambda q, k: M.make_lcsa_mask(q, k, 32, 32, 6, 8, num_frames=64),
}


def test_large_cases_cover_every_builder():
    assert sorted(LARGE) == BUILDERS


@pytest.mark.parametrize("name", sorted(LARGE))
def test_large_is_fast_and_lean(name):
    qk = (torch.randn(2, N_LARGE, 32), torch.randn(2, N_LARGE, 32)) if name in ("make_topk_spatial_mask",
                                                                               "make_lcsa_mask") else ()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    m = LARGE[name](*qk)
    elapsed = time.perf_counter() - t0
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert m.dtype == torch.bool and m.shape[-2] >= 500
    assert elapsed < 1.0, f"{name} took {elapsed:.3f} s"
    assert grown_mib < 512, f"{name} grew the peak memory by {grown_mib:.0f} MiB (an N x N mask is 4 GiB)"


# ------------------------------------------------------------- device, docs, import

def test_pure_shape_builders_run_on_device(device):
    calls = {
        "causal": lambda dev: M.make_causal_block_mask(300, 64, device=dev),
        "segment": lambda dev: M.make_causal_segment_mask([100, 0, 77], 64, device=dev),
        "spatial": lambda dev: M.make_spatial_3d_mask(9, 7, 5, 2, 1, 32, device=dev),
        "reference": lambda dev: M.make_reference_frame_mask(9, 7, 5, [1], 32, device=dev),
        "cross": lambda dev: M.make_cross_stream_mask(301, 77, 16, "temporal", num_frames=7, device=dev),
    }
    for name, call in calls.items():
        got = call(device)
        assert got.device.type == device, name
        assert torch.equal(got.cpu(), call("cpu")), name
    lens = torch.tensor([100, 0, 77], device=device)
    assert M.make_segment_mask(lens, 64).device.type == device
    q = torch.randn(2, 300, 16, device=device)
    sel = M.make_topk_spatial_mask(q, q, 2, 64)
    assert sel.device.type == device
    assert torch.equal(sel.cpu(), M.make_topk_spatial_mask(q.cpu(), q.cpu(), 2, 64))


def test_docstring_examples():
    for name in BUILDERS:
        assert ">>>" in getattr(M, name).__doc__, name
    failures, tried = doctest.testmod(M, verbose=False, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried >= len(BUILDERS) and failures == 0


def test_masks_imports_only_torch_and_math():
    tree = ast.parse(Path(M.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add("." if node.level else node.module.split(".")[0])
    assert roots <= {"torch", "math", "__future__"}, roots


@pytest.mark.skipif(not _SRC.exists(), reason="no source tree")
def test_reexported_at_top_level_without_the_extension():
    """The source package (which has no compiled extension) imports and re-exports the builders."""
    code = ("import steelattn, steelattn.masks as m\n"
            "missing = [n for n in m.__all__ if getattr(steelattn, n, None) is not getattr(m, n)]\n"
            "assert not missing, missing\n"
            "assert set(m.__all__) <= set(steelattn.__all__)\n")
    env = dict(os.environ, PYTHONPATH=str(_SRC.parents[1]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=_SRC.parents[1])
    assert r.returncode == 0, r.stderr
