"""Block-mask builders for block-sparse attention.

Every builder returns a boolean block mask (True = the block is computed) of shape
[NQ, NK], NQ = ceil(N_q / bq), NK = ceil(N_k / bk), for a `block_size` that is an int
or a (bq, bk) pair of positive multiples of 16 (default (128, 128)). Query block a covers
query tokens [a*bq, min((a+1)*bq, N_q)), key block b covers key tokens
[b*bk, min((b+1)*bk, N_k)). Each builder documents a token-level rule allowed(i, j);
the block mask is exactly its "any" reduction: a block is active iff at least one
(query, key) token pair inside it is allowed. Masking inside an active block (causal,
windows) is the kernel's job; pass the matching `causal=` / `window_size=` to the
attention call when the rule needs it.

`token_level=True` returns the [N_q, N_k] token mask itself (it materialises N_q x N_k:
meant for references and small sizes).

Video tokens are ordered frame-major, raster within a frame: token n is
(t, y, x) with n = (t * height + y) * width + x. Image tokens: n = y * width + x.

The block masks are computed from per-block token ranges without materialising the
token mask: a block's contiguous token range is covered exactly by at most 2*d - 1
boxes of the d-dimensional grid, and every rule here is a union of terms that are
products of per-axis conditions, so a box pair has an allowed token pair iff each axis
has one. Everything runs on `device` (or on the device of the tensor inputs) with
tensor ops; the only Python loops are over the handful of boxes and terms.

This module imports only torch and math, so it works without the compiled extension.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "make_adaptive_window_mask", "make_axial_spatial_mask", "make_axial_temporal_mask",
    "make_causal_block_mask", "make_causal_segment_mask", "make_cross_stream_mask",
    "make_dilated_temporal_mask", "make_lcsa_mask", "make_reference_frame_mask",
    "make_segment_mask", "make_sink_window_mask", "make_sliding_window_mask",
    "make_spatial_2d_mask", "make_spatial_3d_mask", "make_topk_spatial_mask",
]

DEFAULT_BLOCK_SIZE = (128, 128)


# --------------------------------------------------------------------------- checks

def _int(fn, name, v, minimum=None):
    """v as a Python int (bool and non-integral values refused), at least `minimum`."""
    if isinstance(v, bool) or not hasattr(type(v), "__index__"):
        raise ValueError(f"{fn}: {name} must be an int, got {v!r}")
    if isinstance(v, torch.Tensor) and (v.dim() != 0 or v.is_floating_point()):
        raise ValueError(f"{fn}: {name} must be an int, got a tensor of shape {tuple(v.shape)}")
    v = int(v.__index__())
    if minimum is not None and v < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {v}")
    return v


def _pair(fn, name, v, minimum):
    """An int or a pair of ints, as a pair."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{fn}: {name} must be an int or a pair of ints, got {v!r}")
        return _int(fn, name, v[0], minimum), _int(fn, name, v[1], minimum)
    v = _int(fn, name, v, minimum)
    return v, v


def _block_size(fn, block_size):
    if isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        vals = tuple(block_size)
    else:
        vals = (block_size, block_size)
    for b in vals:
        if isinstance(b, bool) or not hasattr(type(b), "__index__") or isinstance(b, torch.Tensor) \
                or int(b.__index__()) <= 0 or int(b.__index__()) % 16:
            raise ValueError(f"{fn}: block_size must be a positive multiple of 16 or a (bq, bk) pair "
                             f"of them, got {block_size!r}")
    return int(vals[0].__index__()), int(vals[1].__index__())


def _device(fn, device):
    try:
        return torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{fn}: device {device!r} is not a torch device") from e


def _window(fn, window_size, causal):
    """(left, right) of a window: an int w is (w, 0) when causal else (w, w); a pair is
    (left, right) with -1 = unbounded (None here); causal forces right = 0."""
    if isinstance(window_size, (tuple, list)):
        if len(window_size) != 2:
            raise ValueError(f"{fn}: window_size must be an int or a (left, right) pair, got {window_size!r}")
        left, right = (_int(fn, "window_size", w, -1) for w in window_size)
        left = None if left == -1 else left
        right = None if right == -1 else right
    else:
        left = right = _int(fn, "window_size", window_size, 0)
    if causal:
        right = 0
    return left, right


def _lengths(fn, name, lengths, device):
    """Segment lengths (list/tuple of ints or a 1-D integer tensor, each >= 0, total >= 1)
    as an int64 tensor; a tensor keeps its device."""
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool \
                or lengths.is_complex() or lengths.numel() == 0:
            raise ValueError(f"{fn}: {name} must be a non-empty 1-D integer tensor, got dtype {lengths.dtype} "
                             f"shape {tuple(lengths.shape)}")
        t = lengths.to(torch.int64)
    else:
        if not isinstance(lengths, (tuple, list)) or len(lengths) == 0:
            raise ValueError(f"{fn}: {name} must be a non-empty list of ints or a 1-D integer tensor, "
                             f"got {lengths!r}")
        t = torch.tensor([_int(fn, name, v) for v in lengths], dtype=torch.int64, device=device)
    if bool((t < 0).any()):
        raise ValueError(f"{fn}: {name} must be >= 0, got {t.tolist()}")
    if int(t.sum()) < 1:
        raise ValueError(f"{fn}: {name} must total at least 1 token, got {t.tolist()}")
    return t


# ------------------------------------------------------- ranges and box decomposition

def _ranges(n, b, device):
    """First and last token index (inclusive) of each block of b tokens over n tokens."""
    lo = torch.arange(0, n, b, device=device, dtype=torch.int64)
    return lo, torch.clamp(lo + (b - 1), max=n - 1)


def _unravel(idx, dims):
    """Raster index -> coordinates, most significant axis first."""
    coords = []
    for d in reversed(dims[1:]):
        coords.append(idx % d)
        idx = torch.div(idx, d, rounding_mode="floor")
    coords.append(idx)
    return coords[::-1]


def _cover(a, b, dims):
    """Exact cover of the raster ranges [a, b] (coordinate lists, a <= b) of a grid of shape
    `dims` by 2*len(dims) - 1 boxes. Returns [(lo_coords, hi_coords, valid)], each
    coordinate and `valid` a tensor with one entry per range."""
    n = len(dims)
    if n == 1:
        return [(list(a), list(b), torch.ones_like(a[0], dtype=torch.bool))]
    zero = torch.zeros_like(a[0])
    last = [torch.full_like(a[0], d - 1) for d in dims]
    # a0 < b0: the tail of a's slab, the full slabs between, the head of b's slab.
    boxes = []
    for l in range(n - 1, 0, -1):  # axes < l fixed to a, axis l above a (from a on the last axis)
        lo = a[:l] + [a[l] + (0 if l == n - 1 else 1)] + [zero] * (n - l - 1)
        hi = a[:l] + last[l:]
        boxes.append((lo, hi, lo[l] <= hi[l]))
    lo, hi = [a[0] + 1] + [zero] * (n - 1), [b[0] - 1] + last[1:]
    boxes.append((lo, hi, lo[0] <= hi[0]))
    for l in range(1, n):  # axes < l fixed to b, axis l below b (up to b on the last axis)
        lo = b[:l] + [zero] * (n - l)
        hi = b[:l] + [b[l] - (0 if l == n - 1 else 1)] + last[l + 1:]
        boxes.append((lo, hi, lo[l] <= hi[l]))
    # a0 == b0: the cover of the tails inside that slab.
    same = a[0] == b[0]
    inner = _cover(a[1:], b[1:], dims[1:])
    out = []
    for s, (lo, hi, v) in enumerate(boxes):
        if s < len(inner):
            ilo, ihi, iv = inner[s]
            lo = [torch.where(same, x, y) for x, y in zip([a[0]] + ilo, lo)]
            hi = [torch.where(same, x, y) for x, y in zip([a[0]] + ihi, hi)]
            out.append((lo, hi, torch.where(same, iv, v)))
        else:
            out.append((lo, hi, v & ~same))
    return out


def _boxes(lo, hi, dims):
    """Boxes covering each block's token range, dropping slots no block uses."""
    boxes = _cover(_unravel(lo, dims), _unravel(hi, dims), dims) if len(dims) > 1 else \
        [([lo], [hi], torch.ones_like(lo, dtype=torch.bool))]
    return [bx for bx in boxes if bool(bx[2].any())]


def _any_pairs(qboxes, kboxes, terms, nq, nk, device):
    """[NQ, NK] bool: some box pair has a token pair satisfying some term. A term is a list
    with one predicate (or None = any) per axis; a predicate takes the query interval
    [qlo, qhi] ([NQ, 1]) and the key interval [klo, khi] ([1, NK]) of its axis and says
    whether some coordinate pair in them satisfies the axis condition."""
    out = torch.zeros(nq, nk, dtype=torch.bool, device=device)
    for qlo, qhi, qv in qboxes:
        qlo, qhi = [c[:, None] for c in qlo], [c[:, None] for c in qhi]
        for klo, khi, kv in kboxes:
            klo, khi = [c[None, :] for c in klo], [c[None, :] for c in khi]
            pair = qv[:, None] & kv[None, :]
            for term in terms:
                hit = pair.clone()
                for ax, pred in enumerate(term):
                    if pred is not None:
                        r = pred(qlo[ax], qhi[ax], klo[ax], khi[ax])
                        if r is not None:
                            hit &= r
                out |= hit
    return out


def _grid_mask(dims, terms, bq, bk, device):
    """Block mask of a self-attention rule over the grid `dims` (query and key grids equal)."""
    n = math.prod(dims)
    qlo, qhi = _ranges(n, bq, device)
    klo, khi = _ranges(n, bk, device)
    return _any_pairs(_boxes(qlo, qhi, dims), _boxes(klo, khi, dims), terms, qlo.numel(), klo.numel(), device)


def _build(dims, terms, bq, bk, device, token_level):
    return _grid_mask(dims, terms, 1, 1, device) if token_level else _grid_mask(dims, terms, bq, bk, device)


# ----------------------------------------------------------------- axis predicates

def _delta(dlo, dhi):
    """The key coordinate minus the query coordinate lies in [dlo, dhi] (None = unbounded).
    Over intervals the difference takes every integer in [klo - qhi, khi - qlo]."""
    if dlo is None and dhi is None:
        return None

    def pred(qlo, qhi, klo, khi):
        # shifts on the [NQ, 1] side, one broadcast comparison per bound
        if dlo is None:
            return klo <= qhi + dhi
        r = khi >= qlo + dlo
        return r if dhi is None else r & (klo <= qhi + dhi)
    return pred


def _delta_multiple(m, dlo, dhi):
    """key - query is a multiple of m and lies in [dlo, dhi] (None = unbounded)."""
    def pred(qlo, qhi, klo, khi):
        lo, hi = klo - qhi, khi - qlo
        if dlo is not None:
            lo = torch.clamp(lo, min=dlo)
        if dhi is not None:
            hi = torch.clamp(hi, max=dhi)
        first = -torch.div(-lo, m, rounding_mode="floor") * m  # smallest multiple of m >= lo
        return first <= hi
    return pred


def _key_in(member):
    """The key coordinate is in a set, given as a bool tensor over the axis."""
    prefix = torch.cat([member.new_zeros(1, dtype=torch.int64), torch.cumsum(member.to(torch.int64), 0)])

    def pred(qlo, qhi, klo, khi):
        return (prefix[khi + 1] - prefix[klo]) > 0
    return pred


def _same_window(size, offset):
    """floor((q + offset) / size) == floor((k + offset) / size): the window ids of an interval
    are a contiguous range, so two intervals share a window iff their id ranges overlap."""
    def pred(qlo, qhi, klo, khi):
        f = lambda x: torch.div(x + offset, size, rounding_mode="floor")  # noqa: E731
        return (f(qlo) <= f(khi)) & (f(klo) <= f(qhi))
    return pred


# ---------------------------------------------------------------------- 1-D rules

def _flat_mask(n_q, n_k, terms, bq, bk, device, token_level):
    if token_level:
        bq = bk = 1
    qlo, qhi = _ranges(n_q, bq, device)
    klo, khi = _ranges(n_k, bk, device)
    one = lambda lo: torch.ones_like(lo, dtype=torch.bool)  # noqa: E731
    return _any_pairs([([qlo], [qhi], one(qlo))], [([klo], [khi], one(klo))], terms,
                      qlo.numel(), klo.numel(), device)


def make_causal_block_mask(seq_len, block_size=DEFAULT_BLOCK_SIZE, *, seq_len_k=None, device=None,
                           token_level=False):
    """Causal block mask (lower block triangle).

    Token rule (causal aligned bottom-right, as in `flash_attention(causal=True)`):
    with N = seq_len queries and S = seq_len_k keys (default N), query i sees key j iff
    j <= i + S - N. Pass `causal=True` to the attention call for the token masking inside
    the diagonal blocks.

    >>> make_causal_block_mask(300, block_size=128).int().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    >>> make_causal_block_mask(100, block_size=(32, 64), seq_len_k=160).shape
    torch.Size([4, 3])
    """
    fn = "make_causal_block_mask"
    bq, bk = _block_size(fn, block_size)
    n = _int(fn, "seq_len", seq_len, 1)
    s = n if seq_len_k is None else _int(fn, "seq_len_k", seq_len_k, 1)
    return _flat_mask(n, s, [[_delta(None, s - n)]], bq, bk, _device(fn, device), token_level)


def make_sliding_window_mask(seq_len, window_size, block_size=DEFAULT_BLOCK_SIZE, causal=False, *,
                             seq_len_k=None, device=None, token_level=False):
    """Sliding-window block mask.

    Token rule, with N = seq_len, S = seq_len_k (default N) and i' = i + S - N (the query's
    position aligned bottom-right, as in `flash_attention`): query i sees key j iff
    i' - left <= j <= i' + right. `window_size` is an int w, meaning (left, right) = (w, 0)
    when `causal` (i' - w <= j <= i') and (w, w) otherwise (|i' - j| <= w), or a
    (left, right) pair with -1 = unbounded on that side; `causal=True` sets right = 0.
    Pass the same `window_size` (and `causal`) to the attention call for the token masking
    inside active blocks.

    >>> make_sliding_window_mask(512, 100, block_size=128, causal=True).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    >>> make_sliding_window_mask(4096, window_size=(256, 0), block_size=64).sum().item()
    310
    """
    fn = "make_sliding_window_mask"
    bq, bk = _block_size(fn, block_size)
    n = _int(fn, "seq_len", seq_len, 1)
    s = n if seq_len_k is None else _int(fn, "seq_len_k", seq_len_k, 1)
    left, right = _window(fn, window_size, causal)
    off = s - n
    term = [_delta(None if left is None else off - left, None if right is None else off + right)]
    return _flat_mask(n, s, [term], bq, bk, _device(fn, device), token_level)


def make_sink_window_mask(seq_len, window_size, num_sink_tokens, block_size=DEFAULT_BLOCK_SIZE, causal=True,
                          *, seq_len_k=None, device=None, token_level=False):
    """StreamingLLM attention: a few global "sink" keys plus a sliding window.

    Token rule, with N = seq_len, S = seq_len_k (default N), i' = i + S - N and
    (left, right) from `window_size` exactly as in `make_sliding_window_mask` (int w:
    (w, 0) when `causal`, (w, w) otherwise; a pair with -1 = unbounded): query i sees key j
    iff i' - left <= j <= i' + right, or j < num_sink_tokens (and, when `causal`, j <= i').
    The sinks are keys only: sink queries follow the window rule like any other query.

    >>> make_sink_window_mask(512, 64, 4, block_size=128).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]]
    """
    fn = "make_sink_window_mask"
    bq, bk = _block_size(fn, block_size)
    n = _int(fn, "seq_len", seq_len, 1)
    s = n if seq_len_k is None else _int(fn, "seq_len_k", seq_len_k, 1)
    left, right = _window(fn, window_size, causal)
    sinks = _int(fn, "num_sink_tokens", num_sink_tokens, 0)
    off = s - n
    window = [_delta(None if left is None else off - left, None if right is None else off + right)]
    terms = [window]
    if sinks:
        def sink(qlo, qhi, klo, khi):
            # the smallest key and the largest query are the best witnesses of both conditions
            r = klo < sinks
            return r & (klo - qhi <= off) if causal else r
        terms.append([sink])
    return _flat_mask(n, s, terms, bq, bk, _device(fn, device), token_level)


# ------------------------------------------------------------------ segment rules

def _segment_mask(len_q, len_k, bq, bk, causal, device):
    """Tokens see only tokens of the same segment (segment s: query tokens
    [cq[s], cq[s+1]), key tokens [ck[s], ck[s+1])); with `causal` also
    j - ck[s] <= i - cq[s] + len_k[s] - len_q[s] (bottom-right within the segment)."""
    cq = torch.cat([len_q.new_zeros(1), torch.cumsum(len_q, 0)])
    ck = torch.cat([len_k.new_zeros(1), torch.cumsum(len_k, 0)])
    n_q, n_k = int(cq[-1]), int(ck[-1])
    qlo, qhi = (x[:, None] for x in _ranges(n_q, bq, device))  # [NQ, 1]
    klo, khi = (x[None, :] for x in _ranges(n_k, bk, device))  # [1, NK]
    seg = lambda cu, idx: torch.searchsorted(cu[1:].contiguous(), idx.contiguous(), right=True)  # noqa: E731
    sq_lo, sq_hi, sk_lo, sk_hi = seg(cq, qlo), seg(cq, qhi), seg(ck, klo), seg(ck, khi)
    # The segments both blocks touch lie in [lo, hi], lo = max(sq_lo, sk_lo), hi = min(sq_hi, sk_hi);
    # each bound is one side's segment, so per-segment values are gathered on the [NQ, 1] or
    # [1, NK] side and selected with where (no [NQ, NK] gathers).
    lo_from_q, hi_from_q = sq_lo >= sk_lo, sq_hi <= sk_hi
    # Segments strictly between lo and hi lie wholly inside both blocks: any with a query
    # and a key token has an allowed pair (its last query sees its first key, causal or not).
    both = torch.cat([len_q.new_zeros(1), torch.cumsum((len_q > 0) & (len_k > 0), 0)])
    g = len_q.numel()
    pick = lambda c, a, b: torch.where(c, a, b)  # noqa: E731
    n_hi = pick(hi_from_q, both[sq_hi], both[sk_hi])  # segments < hi with both parts
    n_lo1 = pick(lo_from_q, both[(sq_lo + 1).clamp(max=g)], both[(sk_lo + 1).clamp(max=g)])  # ... < lo + 1
    inner = n_hi > n_lo1

    def meets(s):  # the block pair has an allowed pair in segment s ([NQ, 1] or [1, NK] ids)
        q0 = torch.maximum(qlo, cq[s])
        q1 = torch.minimum(qhi, cq[s + 1] - 1)
        k0 = torch.maximum(klo, ck[s])
        k1 = torch.minimum(khi, ck[s + 1] - 1)
        ok = (q0 <= q1) & (k0 <= k1)
        if causal:
            ok &= (k0 - ck[s]) <= (q1 - cq[s]) + (len_k[s] - len_q[s])
        return ok
    at_lo = pick(lo_from_q, meets(sq_lo), meets(sk_lo))
    at_hi = pick(hi_from_q, meets(sq_hi), meets(sk_hi))
    lo_le_hi = pick(lo_from_q, sq_lo, sk_lo) <= pick(hi_from_q, sq_hi, sk_hi)
    return lo_le_hi & (inner | at_lo | at_hi)


def _segments(fn, segment_lengths, segment_lengths_k, device, names=("segment_lengths", "segment_lengths_k")):
    dev = segment_lengths.device if isinstance(segment_lengths, torch.Tensor) else _device(fn, device)
    len_q = _lengths(fn, names[0], segment_lengths, dev)
    if segment_lengths_k is None:
        return len_q, len_q, dev
    len_k = _lengths(fn, names[1], segment_lengths_k, dev).to(dev)
    if len_k.numel() != len_q.numel():
        raise ValueError(f"{fn}: {names[1]} has {len_k.numel()} segments but {names[0]} has "
                         f"{len_q.numel()}; they must match")
    return len_q, len_k, dev


def make_segment_mask(segment_lengths, block_size=DEFAULT_BLOCK_SIZE, *, segment_lengths_k=None, device=None,
                      token_level=False):
    """Block-diagonal mask of packed segments (documents, images, clips), each isolated.

    Token rule: the tokens are the segments laid end to end; segment s holds query tokens
    [sum(lengths[:s]), sum(lengths[:s+1])) and likewise key tokens with
    `segment_lengths_k` (default: the same lengths). Query i sees key j iff both are in the
    same segment. Lengths may be 0. A list runs on `device`; a tensor on its own device.

    >>> make_segment_mask([100, 60, 96], block_size=64).int().tolist()
    [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    """
    return _segment_builder("make_segment_mask", segment_lengths, block_size, segment_lengths_k, device,
                            token_level, causal=False)


def make_causal_segment_mask(segment_lengths, block_size=DEFAULT_BLOCK_SIZE, *, segment_lengths_k=None,
                             device=None, token_level=False):
    """Packed segments, causal inside each segment.

    Token rule: as `make_segment_mask` (same segment), and within segment s, with local
    positions p = i - (start of s among queries), r = j - (start of s among keys) and
    segment lengths Lq, Lk: r <= p + Lk - Lq (causal aligned bottom-right per segment,
    as varlen attention does; j <= i when query and key lengths are equal).

    >>> make_causal_segment_mask([100, 60, 96], block_size=64).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    return _segment_builder("make_causal_segment_mask", segment_lengths, block_size, segment_lengths_k, device,
                            token_level, causal=True)


def _segment_builder(fn, segment_lengths, block_size, segment_lengths_k, device, token_level, causal):
    bq, bk = _block_size(fn, block_size)
    len_q, len_k, dev = _segments(fn, segment_lengths, segment_lengths_k, device)
    if token_level:
        bq = bk = 1
    return _segment_mask(len_q, len_k, bq, bk, causal, dev)


# -------------------------------------------------------------- image/video rules

def _grid(fn, height, width, patch_size=1):
    h = _int(fn, "height", height, 1)
    w = _int(fn, "width", width, 1)
    p = _int(fn, "patch_size", patch_size, 1)
    if h % p or w % p:
        raise ValueError(f"{fn}: patch_size {p} must divide height {h} and width {w}")
    return h // p, w // p


def _radius(fn, name, r):
    return _pair(fn, name, r, 0)


def make_spatial_2d_mask(height, width, spatial_radius, block_size=DEFAULT_BLOCK_SIZE, patch_size=1, *,
                         device=None, token_level=False):
    """Image locality: each token attends to a square neighbourhood (Chebyshev distance).

    The token grid is (height / patch_size) x (width / patch_size) patches (patch_size
    must divide both; with the default 1, height and width count tokens), in raster order
    n = y * W + x. `spatial_radius` is r or (ry, rx), in patches. Query (yi, xi) sees key
    (yj, xj) iff |yi - yj| <= ry and |xi - xj| <= rx.

    >>> m = make_spatial_2d_mask(32, 32, 2, block_size=128)
    >>> m.shape, m.sum().item()
    (torch.Size([8, 8]), 22)
    """
    fn = "make_spatial_2d_mask"
    bq, bk = _block_size(fn, block_size)
    h, w = _grid(fn, height, width, patch_size)
    ry, rx = _radius(fn, "spatial_radius", spatial_radius)
    return _build((h, w), [[_delta(-ry, ry), _delta(-rx, rx)]], bq, bk, _device(fn, device), token_level)


def make_spatial_3d_mask(height, width, num_frames, spatial_radius, temporal_radius,
                         block_size=DEFAULT_BLOCK_SIZE, patch_size=1, *, device=None, token_level=False):
    """Video locality: a spatial square neighbourhood over nearby frames.

    Tokens are frame-major: n = (t * H + y) * W + x with the (H, W) patch grid of
    `make_spatial_2d_mask`. Query (ti, yi, xi) sees key (tj, yj, xj) iff
    |ti - tj| <= temporal_radius, |yi - yj| <= ry and |xi - xj| <= rx
    (`spatial_radius` r or (ry, rx)).

    >>> m = make_spatial_3d_mask(32, 32, 16, spatial_radius=6, temporal_radius=1)
    >>> m.shape, round(m.float().mean().item(), 3)
    (torch.Size([128, 128]), 0.095)
    """
    fn = "make_spatial_3d_mask"
    bq, bk = _block_size(fn, block_size)
    h, w = _grid(fn, height, width, patch_size)
    t = _int(fn, "num_frames", num_frames, 1)
    ry, rx = _radius(fn, "spatial_radius", spatial_radius)
    rt = _int(fn, "temporal_radius", temporal_radius, 0)
    terms = [[_delta(-rt, rt), _delta(-ry, ry), _delta(-rx, rx)]]
    return _build((t, h, w), terms, bq, bk, _device(fn, device), token_level)


def make_axial_spatial_mask(height, width, num_frames, block_size=DEFAULT_BLOCK_SIZE, *, spatial_radius=None,
                            device=None, token_level=False):
    """Axial (factored) attention, spatial axis: each token attends within its own frame.

    Frame-major tokens n = (t * height + y) * width + x. Query (ti, yi, xi) sees key
    (tj, yj, xj) iff tj == ti and, when `spatial_radius` (r or (ry, rx)) is given,
    |yi - yj| <= ry and |xi - xj| <= rx.

    >>> make_axial_spatial_mask(16, 16, 4, block_size=128).int().tolist()[:3]
    [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]]
    """
    fn = "make_axial_spatial_mask"
    bq, bk = _block_size(fn, block_size)
    h, w = _grid(fn, height, width)
    t = _int(fn, "num_frames", num_frames, 1)
    if spatial_radius is None:
        term = [_delta(0, 0), None, None]
    else:
        ry, rx = _radius(fn, "spatial_radius", spatial_radius)
        term = [_delta(0, 0), _delta(-ry, ry), _delta(-rx, rx)]
    return _build((t, h, w), [term], bq, bk, _device(fn, device), token_level)


def make_axial_temporal_mask(height, width, num_frames, block_size=DEFAULT_BLOCK_SIZE, *, temporal_radius=None,
                             causal=False, device=None, token_level=False):
    """Axial (factored) attention, temporal axis: each token attends to the same pixel
    position in other frames.

    Frame-major tokens n = (t * height + y) * width + x. Query (ti, yi, xi) sees key
    (tj, yj, xj) iff yj == yi, xj == xi, and tj - ti lies in [-r, r] (`causal`:
    [-r, 0]) with r = `temporal_radius` (None = unbounded).

    >>> m = make_axial_temporal_mask(8, 8, 8, block_size=64, causal=True)
    >>> m.int().tolist()[2]
    [1, 1, 1, 0, 0, 0, 0, 0]
    """
    fn = "make_axial_temporal_mask"
    bq, bk = _block_size(fn, block_size)
    h, w = _grid(fn, height, width)
    t = _int(fn, "num_frames", num_frames, 1)
    r = None if temporal_radius is None else _int(fn, "temporal_radius", temporal_radius, 0)
    term = [_delta(None if r is None else -r, 0 if causal else r), _delta(0, 0), _delta(0, 0)]
    return _build((t, h, w), [term], bq, bk, _device(fn, device), token_level)


def make_dilated_temporal_mask(height, width, num_frames, dilation_rate, local_window,
                               block_size=DEFAULT_BLOCK_SIZE, *, causal=False, device=None, token_level=False):
    """Dilated temporal attention: whole nearby frames plus every `dilation_rate`-th frame.

    Frame-major tokens n = (t * height + y) * width + x. Query (ti, ., .) sees every token
    of frame tj iff d = tj - ti satisfies |d| <= local_window or d % dilation_rate == 0;
    with `causal`, additionally d <= 0.

    >>> make_dilated_temporal_mask(8, 8, 8, dilation_rate=4, local_window=1, block_size=64).int().tolist()[0]
    [1, 1, 0, 0, 1, 0, 0, 0]
    """
    fn = "make_dilated_temporal_mask"
    bq, bk = _block_size(fn, block_size)
    h, w = _grid(fn, height, width)
    t = _int(fn, "num_frames", num_frames, 1)
    rate = _int(fn, "dilation_rate", dilation_rate, 1)
    lw = _int(fn, "local_window", local_window, 0)
    hi = 0 if causal else None
    terms = [[_delta(-lw, 0 if causal else lw), None, None], [_delta_multiple(rate, None, hi), None, None]]
    return _build((t, h, w), terms, bq, bk, _device(fn, device), token_level)


def make_reference_frame_mask(height, width, num_frames, reference_frames, block_size=DEFAULT_BLOCK_SIZE, *,
                              local_window=1, device=None, token_level=False):
    """Global reference frames plus local temporal context.

    Frame-major tokens n = (t * height + y) * width + x. Query (ti, ., .) sees every token
    of frame tj iff tj is in `reference_frames` (ints in [0, num_frames): a list, built on
    `device`, or a 1-D integer tensor, used on its own device) or |ti - tj| <= local_window.
    The reference frames are global keys: as queries they follow the local rule like every
    other frame.

    >>> make_reference_frame_mask(8, 8, 6, [0], block_size=64, local_window=0).int().tolist()[3]
    [1, 0, 0, 1, 0, 0]
    """
    fn = "make_reference_frame_mask"
    bq, bk = _block_size(fn, block_size)
    h, w = _grid(fn, height, width)
    t = _int(fn, "num_frames", num_frames, 1)
    lw = _int(fn, "local_window", local_window, 0)
    if isinstance(reference_frames, torch.Tensor):
        if reference_frames.dim() != 1 or reference_frames.is_floating_point() or \
                reference_frames.dtype == torch.bool:
            raise ValueError(f"{fn}: reference_frames must be a 1-D integer tensor or a list of ints")
        dev, refs = reference_frames.device, reference_frames.to(torch.int64)
    elif isinstance(reference_frames, (tuple, list)):
        dev = _device(fn, device)
        refs = torch.tensor([_int(fn, "reference_frames", f) for f in reference_frames], dtype=torch.int64,
                            device=dev)
    else:
        raise ValueError(f"{fn}: reference_frames must be a list of ints or a 1-D integer tensor, "
                         f"got {reference_frames!r}")
    if refs.numel() and bool(((refs < 0) | (refs >= t)).any()):
        raise ValueError(f"{fn}: reference_frames must lie in [0, {t}), got {refs.tolist()}")
    member = torch.zeros(t, dtype=torch.bool, device=dev)
    member[refs] = True
    terms = [[_key_in(member), None, None], [_delta(-lw, lw), None, None]]
    return _build((t, h, w), terms, bq, bk, dev, token_level)


def make_adaptive_window_mask(height, width, num_frames, base_window_h, base_window_w, base_window_t,
                              train_resolution, inference_resolution, block_size=DEFAULT_BLOCK_SIZE, *,
                              shifted=False, device=None, token_level=False):
    """Resolution-adaptive partitioned window attention (SeedVR2-style).

    The frame-major token grid (num_frames, height, width) is cut into non-overlapping
    windows of wt x wh x ww tokens, scaled so that a window covers the same share of the
    picture as in training (and so the same number of windows, which keeps relative
    positions inside the range RoPE saw in training):
    wh = clamp(ceil(base_window_h * inf_h / train_h), 1, height),
    ww = clamp(ceil(base_window_w * inf_w / train_w), 1, width),
    wt = min(base_window_t, num_frames), where `train_resolution` and
    `inference_resolution` are (h, w) pairs (or one int for both; any unit, only the
    ratio matters). Windows are anchored at 0; `shifted=True` moves the window grid by
    half a window (w // 2 per axis, Swin-style, not cyclic: the edge windows are
    smaller). Token (t, y, x) is in window (floor((t + ot) / wt), floor((y + oy) / wh),
    floor((x + ox) / ww)) with o = the shift (0 unless `shifted`); query and key tokens
    attend iff they are in the same window.

    >>> m = make_adaptive_window_mask(32, 32, 4, 8, 8, 1, train_resolution=256, inference_resolution=512)
    >>> m.shape, m.sum().item()
    (torch.Size([32, 32]), 128)
    """
    fn = "make_adaptive_window_mask"
    bq, bk = _block_size(fn, block_size)
    h, w = _grid(fn, height, width)
    t = _int(fn, "num_frames", num_frames, 1)
    bh = _int(fn, "base_window_h", base_window_h, 1)
    bw = _int(fn, "base_window_w", base_window_w, 1)
    bt = _int(fn, "base_window_t", base_window_t, 1)
    th, tw = _pair(fn, "train_resolution", train_resolution, 1)
    ih, iw = _pair(fn, "inference_resolution", inference_resolution, 1)
    wh = min(max(-(-bh * ih // th), 1), h)  # exact integer ceil(bh * ih / th)
    ww = min(max(-(-bw * iw // tw), 1), w)
    wt = min(bt, t)
    offs = (wt // 2, wh // 2, ww // 2) if shifted else (0, 0, 0)
    term = [_same_window(wt, offs[0]), _same_window(wh, offs[1]), _same_window(ww, offs[2])]
    return _build((t, h, w), [term], bq, bk, _device(fn, device), token_level)


# ------------------------------------------------------------ cross attention

def make_cross_stream_mask(n_tokens_q, n_tokens_kv, block_size=DEFAULT_BLOCK_SIZE, pattern="full", *,
                           num_frames=None, temporal_radius=0, segment_lengths_q=None, segment_lengths_kv=None,
                           device=None, token_level=False):
    """Rectangular cross-attention between two streams (e.g. video and audio tokens of a
    dual-stream DiT), n_tokens_q queries x n_tokens_kv keys.

    `pattern`:
      - "full": every query sees every key.
      - "temporal": both streams span the same `num_frames` time steps
        (1 <= num_frames <= min(n_tokens_q, n_tokens_kv)), each spread evenly over its own
        tokens: query i is at time fq(i) = floor(i * num_frames / n_tokens_q), key j at
        fk(j) = floor(j * num_frames / n_tokens_kv); query i sees key j iff
        |fq(i) - fk(j)| <= temporal_radius.
      - "segment": `segment_lengths_q` and `segment_lengths_kv` (same count, totals
        n_tokens_q and n_tokens_kv) pair the q segment s with the kv segment s only, as
        `make_segment_mask` with `segment_lengths_k`.

    >>> make_cross_stream_mask(256, 64, block_size=(64, 16), pattern="temporal", num_frames=4).int().tolist()
    [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    """
    fn = "make_cross_stream_mask"
    bq, bk = _block_size(fn, block_size)
    nq = _int(fn, "n_tokens_q", n_tokens_q, 1)
    nk = _int(fn, "n_tokens_kv", n_tokens_kv, 1)
    if pattern not in ("full", "temporal", "segment"):
        raise ValueError(f"{fn}: pattern must be 'full', 'temporal' or 'segment', got {pattern!r}")
    if token_level:
        bq = bk = 1
    if pattern == "segment":
        if segment_lengths_q is None or segment_lengths_kv is None:
            raise ValueError(f"{fn}: pattern 'segment' needs segment_lengths_q and segment_lengths_kv")
        len_q, len_k, dev = _segments(fn, segment_lengths_q, segment_lengths_kv, device,
                                      ("segment_lengths_q", "segment_lengths_kv"))
        for name, lens, n in (("segment_lengths_q", len_q, nq), ("segment_lengths_kv", len_k, nk)):
            if int(lens.sum()) != n:
                raise ValueError(f"{fn}: {name} total {int(lens.sum())} differs from the token count {n}")
        return _segment_mask(len_q, len_k, bq, bk, False, dev)
    dev = _device(fn, device)
    if pattern == "full":
        return torch.ones(-(-nq // bq), -(-nk // bk), dtype=torch.bool, device=dev)
    if num_frames is None:
        raise ValueError(f"{fn}: pattern 'temporal' needs num_frames")
    f = _int(fn, "num_frames", num_frames, 1)
    if f > min(nq, nk):
        raise ValueError(f"{fn}: num_frames {f} must be <= min(n_tokens_q, n_tokens_kv) = {min(nq, nk)}")
    r = _int(fn, "temporal_radius", temporal_radius, 0)
    # Token -> time step is non-decreasing and, with num_frames <= tokens, steps by at most
    # 1, so a block's time steps are the whole interval between its ends.
    qlo, qhi = _ranges(nq, bq, dev)
    klo, khi = _ranges(nk, bk, dev)
    ft = lambda i, n: torch.div(i * f, n, rounding_mode="floor")  # noqa: E731
    one = lambda lo: torch.ones_like(lo, dtype=torch.bool)  # noqa: E731
    qb = [([ft(qlo, nq)], [ft(qhi, nq)], one(qlo))]
    kb = [([ft(klo, nk)], [ft(khi, nk)], one(klo))]
    return _any_pairs(qb, kb, [[_delta(-r, r)]], qlo.numel(), klo.numel(), dev)


# --------------------------------------------------------- data-dependent rules

def _check_qk(fn, q, k):
    """Shapes (lead, N, S) of q [.., N, D] and k [.., S, D]: 2-D, 3-D [H, ..] or 4-D
    [B, H, ..] with k's heads dividing q's (GQA)."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{fn}: {name} must be a floating-point tensor")
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"{fn}: {name} must be [N, D], [H, N, D] or [B, H, N, D], got shape {tuple(x.shape)}")
    if k.dim() != q.dim() or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{fn}: k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} "
                         f"(same number of dims and head dim)")
    if k.device != q.device:
        raise ValueError(f"{fn}: k is on {k.device} but q is on {q.device}")
    if q.dim() >= 3 and (k.shape[-3] == 0 or q.shape[-3] % k.shape[-3]):
        raise ValueError(f"{fn}: k's {k.shape[-3]} heads must divide q's {q.shape[-3]}")
    if q.dim() == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"{fn}: k batch {k.shape[0]} differs from q batch {q.shape[0]}")
    if q.shape[-2] < 1 or k.shape[-2] < 1:
        raise ValueError(f"{fn}: q and k need at least one token")
    return q.shape[-2], k.shape[-2]


def _pool(x, b):
    """Mean of x [.., N, D] over blocks of b tokens (the last block over its own tokens), fp32."""
    n = x.shape[-2]
    full = n // b
    parts = []
    if full:
        parts.append(x[..., :full * b, :].unflatten(-2, (full, b)).sum(-2, dtype=torch.float32) / b)
    if n % b:
        parts.append(x[..., full * b:, :].sum(-2, keepdim=True, dtype=torch.float32) / (n % b))
    return torch.cat(parts, -2) if len(parts) > 1 else parts[0]


def _select_topk(q, k, top_k, bq, bk, candidates):
    """Per query block, the top_k candidate key blocks by pooled-q . pooled-k (fp32),
    ties to the lower key-block index. candidates: [NQ, NK] bool."""
    pq, pk = _pool(q, bq), _pool(k, bk)
    if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        pk = pk.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scores = pq @ pk.transpose(-1, -2)
    scores = scores.masked_fill(~candidates, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :min(top_k, scores.shape[-1])]
    sel = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)
    return sel & candidates


def _expand(block, bq, bk, n, s):
    return block.repeat_interleave(bq, -2)[..., :n, :].repeat_interleave(bk, -1)[..., :s]


def make_topk_spatial_mask(q, k, top_k, block_size=DEFAULT_BLOCK_SIZE, *, causal=False, token_level=False):
    """Content-aware block selection: each query block keeps its top_k key blocks.

    q is [N, D], [H, N, D] or [B, H, N, D] (steelattn's layout) and k the same with S
    tokens and H or a divisor of H heads (GQA: key head h // (H / Hkv) serves query head h).
    Each block's tokens are mean-pooled (in fp32; the last, partial block over its own
    tokens); score(a, b) = pooled_q[a] . pooled_k[b]. Query block a keeps the top_k key
    blocks by score (all of them if fewer), ties going to the lower key-block index. With
    `causal`, only key blocks that hold a key visible under bottom-right causal masking
    (j <= i + S - N for some query i of the block) are candidates, and the token rule
    below also requires j <= i + S - N.

    Token rule: query i sees key j iff the block pair holding (i, j) is selected (and,
    with `causal`, j <= i + S - N). Returns [NQ, NK], [H, NQ, NK] or [B, H, NQ, NK]
    following q's dims, on q's device.

    >>> g = torch.Generator().manual_seed(0)
    >>> q, k = torch.randn(2, 1000, 64, generator=g), torch.randn(1, 1000, 64, generator=g)
    >>> m = make_topk_spatial_mask(q, k, top_k=3, block_size=128)
    >>> m.shape, m.sum(-1).tolist()[0]
    (torch.Size([2, 8, 8]), [3, 3, 3, 3, 3, 3, 3, 3])
    """
    fn = "make_topk_spatial_mask"
    bq, bk = _block_size(fn, block_size)
    n, s = _check_qk(fn, q, k)
    top_k = _int(fn, "top_k", top_k, 1)
    if causal:
        cand = make_causal_block_mask(n, (bq, bk), seq_len_k=s, device=q.device)
    else:
        cand = torch.ones(-(-n // bq), -(-s // bk), dtype=torch.bool, device=q.device)
    sel = _select_topk(q, k, top_k, bq, bk, cand)
    if not token_level:
        return sel
    tok = _expand(sel, bq, bk, n, s)
    if causal:
        tok = tok & make_causal_block_mask(n, seq_len_k=s, device=q.device, token_level=True)
    return tok


def make_lcsa_mask(q, k, height, width, spatial_radius, top_k, block_size=DEFAULT_BLOCK_SIZE, *, num_frames=1,
                   temporal_radius=None, token_level=False):
    """Locality-constrained sparse attention (FlashVSR LCSA): a spatial window, and inside
    it the top_k key blocks by content.

    Tokens are frame-major, n = (t * height + y) * width + x, N = num_frames * height *
    width for both q and k (shapes as in `make_topk_spatial_mask`). The structural rule:
    query (ti, yi, xi) may see key (tj, yj, xj) iff |yi - yj| <= ry, |xi - xj| <= rx
    (`spatial_radius` r or (ry, rx)) and, when `temporal_radius` is given,
    |ti - tj| <= temporal_radius. Candidates of a query block are the key blocks the
    structural rule reaches (its block mask); among them the block keeps the top_k by
    block-mean score (fp32 pooled_q . pooled_k, ties to the lower index), so every query
    block keeps min(top_k, candidates) blocks.

    Token rule: query i sees key j iff the structural rule allows (i, j) and the block pair
    holding it is selected. Returns [NQ, NK], [H, NQ, NK] or [B, H, NQ, NK] following q's
    dims, on q's device.

    >>> g = torch.Generator().manual_seed(0)
    >>> q = k = torch.randn(1, 4, 2 * 32 * 32, 64, generator=g)
    >>> m = make_lcsa_mask(q, k, 32, 32, spatial_radius=4, top_k=2, num_frames=2)
    >>> m.shape, m.sum(-1).max().item()
    (torch.Size([1, 4, 16, 16]), 2)
    """
    fn = "make_lcsa_mask"
    bq, bk = _block_size(fn, block_size)
    n, s = _check_qk(fn, q, k)
    h, w = _grid(fn, height, width)
    t = _int(fn, "num_frames", num_frames, 1)
    if n != t * h * w or s != t * h * w:
        raise ValueError(f"{fn}: q and k must have num_frames * height * width = {t * h * w} tokens, "
                         f"got {n} and {s}")
    ry, rx = _radius(fn, "spatial_radius", spatial_radius)
    rt = None if temporal_radius is None else _int(fn, "temporal_radius", temporal_radius, 0)
    top_k = _int(fn, "top_k", top_k, 1)
    terms = [[None if rt is None else _delta(-rt, rt), _delta(-ry, ry), _delta(-rx, rx)]]
    sel = _select_topk(q, k, top_k, bq, bk, _grid_mask((t, h, w), terms, bq, bk, q.device))
    if not token_level:
        return sel
    return _expand(sel, bq, bk, n, s) & _grid_mask((t, h, w), terms, 1, 1, q.device)
