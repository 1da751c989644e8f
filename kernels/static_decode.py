"""One-token decode over a static pruned K cache (`harness.static_kcache.StaticKLayer`).

Two calls per attention layer and decode step, both driven by each row's length on the device,
so a step synchronizes nothing, allocates nothing and keeps every launch shape (a CUDA graph
replays it):

- `static_append(layer, key, value, lengths)`: the token at slot t = lengths[row] enters the
  cache. First the ring slot it replaces (slot t - W, W = recent + 1, once that is past the sink)
  moves to the middle: its kept key channels and its value, or, for a head keeping 0 channels, its
  value into the head's running sum. Then the token is written at that ring position (into the
  head while t < sink).
- `static_decode_attention(query, layer, lengths, scaling=...)`: attention of the new token over
  the head [0, min(t + 1, sink)), the middle [0, t - recent - sink) and the ring's slots
  max(sink, t - recent) .. t, with LeanK's rule: full channels for the first `sink` slots and the
  last `recent`; the ring's oldest slot (t - recent) and the middle are scored with the kept
  channels. The plan of `harness.kernels.pruned_decode`: one launch computes every partial (the
  head/ring items, then the middle items of up to four kept-count groups, each compiled for its
  own count), one launch merges them. The middle is cut into a fixed number of splits per
  (row, KV head), sized for the cache's capacity; each split's token range is computed in the
  kernel from the row's length, so a short row's splits are short or empty (an empty split stores
  the empty partial: max -inf, sum 0).

Torch twins of both (`static_append_torch`, `static_decode_attention_torch`) run on CPU and are
the references the Triton path is tested against. The public functions take Triton for CUDA
tensors and the twins otherwise.
"""

from __future__ import annotations

import torch

from harness.kernels import pruned_decode as pd
from harness.kernels.pruned_decode import triton, tl

__all__ = ["static_append", "static_append_torch", "static_decode_attention", "static_decode_attention_torch"]


# --- torch twins ---------------------------------------------------------------------------------


def static_append_torch(layer, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor) -> None:
    """Twin of the append kernel. key (B, Hkv, 1, d), value (B, Hkv, 1, dv); lengths (B,)."""
    sink, window = layer.sink, layer.window
    for b, t in enumerate(lengths.tolist()):
        e = t - window
        if e >= sink:  # the ring slot token t replaces leaves for the middle
            p = (e - sink) % window
            old_k, old_v = layer.ring_k[b, :, p], layer.ring_v[b, :, p]  # (Hkv, d|dv)
            for g in layer.groups:
                g.keys[b, :, e - sink] = old_k.index_select(0, g.heads).gather(-1, g.channels[b])
                g.values[b, :, e - sink] = old_v.index_select(0, g.heads)
            if layer.sum_heads is not None:
                layer.value_sum[b] += old_v.index_select(0, layer.sum_heads).float()
        if t < sink:
            layer.head_k[b, :, t], layer.head_v[b, :, t] = key[b, :, 0], value[b, :, 0]
        else:
            p = (t - sink) % window
            layer.ring_k[b, :, p], layer.ring_v[b, :, p] = key[b, :, 0], value[b, :, 0]


def head_ring_slots(layer, lengths: torch.Tensor):
    """Which of the (sink + W) head and ring positions hold a slot at each row's step, and which
    of those are scored with all channels: (valid, full), each (B, sink + W) bool."""
    sink, recent, window = layer.sink, layer.recent, layer.window
    t = lengths.long()[:, None]
    j = torch.arange(sink + window, device=lengths.device)[None, :]
    in_head = (j < sink) & (j <= t)
    r = t - sink  # the newest token's ring index before the modulo (< 0: the ring is empty)
    age = torch.remainder(r - (j - sink), window)  # steps since the slot at ring position j - sink entered
    in_ring = (j >= sink) & (r >= 0) & (age <= torch.minimum(r, torch.full_like(r, recent)))
    return in_head | in_ring, in_head | (in_ring & (age < recent))


def static_decode_attention_torch(query: torch.Tensor, layer, lengths: torch.Tensor, *, scaling: float) -> torch.Tensor:
    """Twin of the Triton path: query (B, Hq, 1, d) -> (B, 1, Hq, dv) in query's dtype."""
    b, hq, length, d = query.shape
    if length != 1:
        raise ValueError(
            f"static decode attention decodes one token: query must be (B, Hq, 1, d), got {tuple(query.shape)}"
        )
    hkv, dv = layer.num_heads, layer.value_dim
    n_rep = hq // hkv
    q = query.reshape(b, hkv, n_rep, d).float()
    valid, full = head_ring_slots(layer, lengths)
    keys = torch.cat([layer.head_k, layer.ring_k], 2).float()  # (B, Hkv, sink + W, d)
    values = torch.cat([layer.head_v, layer.ring_v], 2).float()
    s_full = q @ keys.transpose(-1, -2)
    s_kept = (q * layer.keep[:, :, None, :]) @ keys.transpose(-1, -2)
    hw = torch.where(full[:, None, None, :], s_full, s_kept) * scaling
    hw = hw.masked_fill(~valid[:, None, None, :], float("-inf"))  # (B, Hkv, n_rep, sink + W)
    n_mid = (lengths.long() - layer.recent - layer.sink).clamp(min=0)  # (B,)
    out = torch.empty(b, hkv, n_rep, dv, dtype=torch.float32, device=query.device)
    for g in layer.groups:
        q_kept = q.index_select(1, g.heads).gather(-1, g.channels[:, :, None, :].expand(-1, -1, n_rep, -1))
        s_mid = (q_kept @ g.keys.float().transpose(-1, -2)) * scaling  # (B, Hg, n_rep, M)
        beyond = torch.arange(layer.capacity, device=query.device)[None, :] >= n_mid[:, None]
        s_mid = s_mid.masked_fill(beyond[:, None, None, :], float("-inf"))
        scores = torch.cat([hw.index_select(1, g.heads), s_mid], -1)
        vals = torch.cat([values.index_select(1, g.heads), g.values.float()], 2)
        out[:, g.heads] = torch.softmax(scores, -1) @ vals
    if (
        layer.sum_heads is not None
    ):  # n_mid scores of exactly 0 whose values sum to value_sum: one column of weight n_mid
        log_n = torch.where(n_mid > 0, n_mid.clamp(min=1).float().log(), float("-inf"))
        column = log_n[:, None, None, None].expand(-1, len(layer.sum_heads), n_rep, 1)
        scores = torch.cat([hw.index_select(1, layer.sum_heads), column], -1)
        mean = layer.value_sum / n_mid.clamp(min=1)[:, None, None]
        vals = torch.cat([values.index_select(1, layer.sum_heads), mean[:, :, None, :]], 2)
        out[:, layer.sum_heads] = torch.softmax(scores, -1) @ vals
    return out.reshape(b, 1, hq, dv).to(query.dtype)


# --- the Triton path -------------------------------------------------------------------------------

if triton is not None:

    @triton.jit(do_not_specialize=["sum_hg", "sink", "window"])
    def _append_kernel(
        len_ptr,
        k_ptr,
        v_ptr,
        sk_b,
        sk_h,
        sv_b,
        sv_h,
        hk_ptr,
        hv_ptr,
        rk_ptr,
        rv_ptr,
        mk_ptr,
        mv_ptr,
        koff_ptr,
        voff_ptr,
        cnt_ptr,
        chan_ptr,
        sum_index_ptr,
        sum_ptr,
        sum_hg,
        sink,
        window,
        HKV: tl.constexpr,
        D: tl.constexpr,
        D_P: tl.constexpr,
        DV: tl.constexpr,
        DV_P: tl.constexpr,
    ):
        """Program (row, KV head): evict the ring slot token t replaces, then write token t.
        Middle stores are flat: (row, head)'s keys start at koff[row, head] (count channels a
        token), its values at voff[row, head] (DV a token)."""
        bh = tl.program_id(0).to(tl.int64)
        h = bh % HKV
        b = bh // HKV
        t = tl.load(len_ptr + b).to(tl.int64)
        cd = tl.arange(0, D_P)
        kmask = cd < D
        dd = tl.arange(0, DV_P)
        vmask = dd < DV
        e = t - window
        if e >= sink:
            p = (e - sink) % window
            old_v = tl.load(rv_ptr + (bh * window + p) * DV + dd, mask=vmask, other=0.0)
            vi = tl.load(sum_index_ptr + h)
            if vi >= 0:  # a head keeping 0 channels: its value joins the running sum
                acc = sum_ptr + (b * sum_hg + vi) * DV + dd
                tl.store(acc, tl.load(acc, mask=vmask, other=0.0) + old_v.to(tl.float32), mask=vmask)
            else:
                c = tl.load(cnt_ptr + h)
                cmask = cd < c
                ch = tl.load(chan_ptr + bh * D + cd, mask=cmask, other=0)
                kept = tl.load(rk_ptr + (bh * window + p) * D + ch, mask=cmask, other=0.0)
                tl.store(mk_ptr + tl.load(koff_ptr + bh) + (e - sink) * c + cd, kept, mask=cmask)
                tl.store(mv_ptr + tl.load(voff_ptr + bh) + (e - sink) * DV + dd, old_v, mask=vmask)
        tl.debug_barrier()  # the evicted slot is read before the new token overwrites it
        new_k = tl.load(k_ptr + b * sk_b + h * sk_h + cd, mask=kmask, other=0.0)
        new_v = tl.load(v_ptr + b * sv_b + h * sv_h + dd, mask=vmask, other=0.0)
        if t < sink:
            tl.store(hk_ptr + (bh * sink + t) * D + cd, new_k, mask=kmask)
            tl.store(hv_ptr + (bh * sink + t) * DV + dd, new_v, mask=vmask)
        else:
            p_new = (t - sink) % window
            tl.store(rk_ptr + (bh * window + p_new) * D + cd, new_k, mask=kmask)
            tl.store(rv_ptr + (bh * window + p_new) * DV + dd, new_v, mask=vmask)

    @triton.jit
    def _head_ring_item(
        item,
        q_ptr,
        m_ptr,
        a_ptr,
        keep_ptr,
        len_ptr,
        hk_ptr,
        hv_ptr,
        rk_ptr,
        rv_ptr,
        sum_index_ptr,
        sum_ptr,
        sum_hg,
        sink,
        recent,
        window,
        n_slots,
        scaling,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        N_REP: tl.constexpr,
        REP_P: tl.constexpr,
        D: tl.constexpr,
        D_P: tl.constexpr,
        DV: tl.constexpr,
        DV_P: tl.constexpr,
        BLOCK: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """Work item (row, KV head) -> its partial over the head and the ring (slot n_slots - 1);
        for a value-sum head also the middle's partial (slot 0: max 0, sum n_mid, acc value_sum;
        the empty partial while there is no middle)."""
        pid_h = (item % HKV).to(tl.int64)
        pid_b = (item // HKV).to(tl.int64)
        bh = pid_b * HKV + pid_h
        rows = tl.arange(0, REP_P)
        rmask = rows < N_REP
        cd = tl.arange(0, D_P)
        dmask_k = cd < D
        dd = tl.arange(0, DV_P)
        dmask = dd < DV
        q, q_kept = pd._query_rows(q_ptr, keep_ptr, bh, rows, rmask, cd, dmask_k, N_REP, D, DOT_F32)
        t = tl.load(len_ptr + pid_b)
        n_head = tl.minimum(t + 1, sink)
        r = t - sink  # the newest token's ring index before the modulo (< 0: the ring is empty)
        r_mod = tl.where(r >= 0, r % window, 0)
        max_age = tl.minimum(recent, r)
        m_i = tl.full([REP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([REP_P], tl.float32)
        acc = tl.zeros([REP_P, DV_P], tl.float32)
        for j0 in range(0, sink + window, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            in_head = j < n_head
            p = j - sink
            age = (r_mod - p + window) % window
            in_ring = (j >= sink) & (j < sink + window) & (age <= max_age)
            k = tl.load(
                hk_ptr + (bh * sink + j)[:, None] * D + cd[None, :], mask=in_head[:, None] & dmask_k[None, :], other=0.0
            )
            k += tl.load(
                rk_ptr + (bh * window + p)[:, None] * D + cd[None, :],
                mask=in_ring[:, None] & dmask_k[None, :],
                other=0.0,
            )
            s_full, s_kept = pd._full_and_kept_scores(q, q_kept, k, DOT_F32)
            full = in_head | (age < recent)
            s = tl.where(full[None, :], s_full, s_kept) * scaling
            s = tl.where((in_head | in_ring)[None, :], s, float("-inf"))
            v = tl.load(
                hv_ptr + (bh * sink + j)[:, None] * DV + dd[None, :], mask=in_head[:, None] & dmask[None, :], other=0.0
            )
            v += tl.load(
                rv_ptr + (bh * window + p)[:, None] * DV + dd[None, :],
                mask=in_ring[:, None] & dmask[None, :],
                other=0.0,
            )
            # with sink 0 a block may come before any real slot: the guarded step
            m_i, l_i, acc = pd._online_softmax_step(s, v, m_i, l_i, acc, DOT_F32, True)
        slot_row = bh * N_REP + rows
        pd._store_partial(m_ptr, a_ptr, slot_row, n_slots - 1, n_slots, m_i, l_i, acc, rmask, dd, dmask, DV)

        vi = tl.load(sum_index_ptr + pid_h)
        if vi >= 0:
            n_mid = tl.maximum(t - recent - sink, 0)
            some = (n_mid > 0).to(tl.float32)
            vsum = tl.load(sum_ptr + (pid_b * sum_hg + vi) * DV + dd, mask=dmask, other=0.0) * some
            zeros = tl.zeros([REP_P], tl.float32)
            m0 = tl.where(n_mid > 0, zeros, float("-inf"))
            pd._store_partial(
                m_ptr,
                a_ptr,
                slot_row,
                0,
                n_slots,
                m0,
                zeros + n_mid.to(tl.float32),
                zeros[:, None] + vsum[None, :],
                rmask,
                dd,
                dmask,
                DV,
            )

    @triton.jit(
        do_not_specialize=[
            "n_rows",
            "n_split",
            "n_slots",
            "sum_hg",
            "sink",
            "recent",
            "window",
            "hg0",
            "hg1",
            "hg2",
            "hg3",
        ]
    )
    def _static_partials_kernel(
        q_ptr,
        m_ptr,
        a_ptr,
        len_ptr,
        n_rows,
        n_split,
        n_slots,
        scaling,
        keep_ptr,
        hk_ptr,
        hv_ptr,
        rk_ptr,
        rv_ptr,
        sum_index_ptr,
        sum_ptr,
        sum_hg,
        sink,
        recent,
        window,
        ch0,
        hd0,
        k0,
        v0,
        hg0,
        khs0,
        vhs0,
        ch1,
        hd1,
        k1,
        v1,
        hg1,
        khs1,
        vhs1,
        ch2,
        hd2,
        k2,
        v2,
        hg2,
        khs2,
        vhs2,
        ch3,
        hd3,
        k3,
        v3,
        hg3,
        khs3,
        vhs3,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        N_REP: tl.constexpr,
        REP_P: tl.constexpr,
        D: tl.constexpr,
        D_P: tl.constexpr,
        DV: tl.constexpr,
        DV_P: tl.constexpr,
        HAS_HW: tl.constexpr,
        HW_BLOCK: tl.constexpr,
        HW_DOT_F32: tl.constexpr,
        NG: tl.constexpr,
        C0: tl.constexpr,
        C1: tl.constexpr,
        C2: tl.constexpr,
        C3: tl.constexpr,
        CP0: tl.constexpr,
        CP1: tl.constexpr,
        CP2: tl.constexpr,
        CP3: tl.constexpr,
        BLOCK: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """Every partial of one static decode step: programs 0..n_rows*HKV-1 the head/ring items
        (when HAS_HW), then the middle items of the NG groups, each row's middle length read from
        `len_ptr` (n_mid = len - sink - recent)."""
        pid = tl.program_id(0)
        n_hw = n_rows * HKV if HAS_HW else 0
        if pid < n_hw:
            _head_ring_item(
                pid,
                q_ptr,
                m_ptr,
                a_ptr,
                keep_ptr,
                len_ptr,
                hk_ptr,
                hv_ptr,
                rk_ptr,
                rv_ptr,
                sum_index_ptr,
                sum_ptr,
                sum_hg,
                sink,
                recent,
                window,
                n_slots,
                scaling,
                HQ,
                HKV,
                N_REP,
                REP_P,
                D,
                D_P,
                DV,
                DV_P,
                HW_BLOCK,
                HW_DOT_F32,
            )
        # n_mid and per_split are per row here (ROW_LENGTHS): `sink` only fills their int32 slots
        pd._middle_items(
            pid - n_hw,
            n_rows,
            q_ptr,
            m_ptr,
            a_ptr,
            sink,
            sink,
            n_split,
            n_slots,
            scaling,
            len_ptr,
            sink + recent,
            ch0,
            hd0,
            k0,
            v0,
            hg0,
            khs0,
            vhs0,
            ch1,
            hd1,
            k1,
            v1,
            hg1,
            khs1,
            vhs1,
            ch2,
            hd2,
            k2,
            v2,
            hg2,
            khs2,
            vhs2,
            ch3,
            hd3,
            k3,
            v3,
            hg3,
            khs3,
            vhs3,
            HQ,
            HKV,
            N_REP,
            REP_P,
            D,
            DV,
            DV_P,
            NG,
            C0,
            C1,
            C2,
            C3,
            CP0,
            CP1,
            CP2,
            CP3,
            BLOCK,
            DOT_F32,
            True,
        )


def _append_triton(layer, key, value, lengths) -> None:
    b, hkv, _, d = key.shape
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    sums = layer.value_sum if layer.value_sum is not None else layer.keep
    _append_kernel[(b * hkv,)](
        lengths,
        key,
        value,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        layer.head_k,
        layer.head_v,
        layer.ring_k,
        layer.ring_v,
        layer.keys_flat,
        layer.values_flat,
        layer.key_offsets,
        layer.value_offsets,
        layer.counts,
        layer.channel_table,
        layer.sum_index,
        sums,
        max(layer.num_sum_heads, 1),
        layer.sink,
        layer.window,
        HKV=hkv,
        D=d,
        D_P=pd._pow2(d, 2),
        DV=layer.value_dim,
        DV_P=pd._pow2(layer.value_dim, 2),
        num_warps=1,
    )


def split_count(layer, batch: int, device, split: int | None = None) -> tuple[int, dict[str, int]]:
    """(splits of the middle per (row, KV head), launch settings): fixed for the cache's capacity,
    so a step's launch shape never changes."""
    tuned = pd.launch(device, layer.capacity, max(layer.head_dim, layer.value_dim))
    dot_f32 = bool(layer.groups) and pd._dot_f32(layer.ring_k, layer.groups[0].keys, layer.groups[0].values)
    block, _ = pd._block_stages(tuned, dot_f32)
    rows = batch * sum(len(g.heads) for g in layer.groups)
    n_split, _ = pd._split_plan(
        layer.capacity, rows, block, split, pd._sm_count(device), tuned["ITEMS_PER_SM"], tuned["MIN_BLOCKS_PER_SPLIT"]
    )
    return n_split, tuned


def _attention_triton(query, layer, lengths, *, scaling: float, split: int | None = None) -> torch.Tensor:
    b, hq, length, d = query.shape
    if length != 1:
        raise ValueError(
            f"static decode attention decodes one token: query must be (B, Hq, 1, d), got {tuple(query.shape)}"
        )
    hkv, dv, dev = layer.num_heads, layer.value_dim, query.device
    n_rep = hq // hkv
    n_split, tuned = split_count(layer, b, dev, split)
    groups = layer.groups
    dot_f32 = bool(groups) and pd._dot_f32(query, groups[0].keys, groups[0].values)
    block, stages = pd._block_stages(tuned, dot_f32)
    n_slots = max(n_split, 1) + 1  # the middle's splits (slot 0 alone for value-sum heads), then the head/ring
    m_buf = torch.empty(b, hkv, n_rep, n_slots, dtype=torch.float32, device=dev)
    acc_buf = torch.empty(b, hkv, n_rep, n_slots, dv + 1, dtype=torch.float32, device=dev)
    query = query.contiguous()
    sums = layer.value_sum if layer.value_sum is not None else acc_buf
    hw_f32 = pd._dot_f32(query, layer.ring_k, layer.ring_v)
    common = [
        query,
        m_buf,
        acc_buf,
        lengths,
        b,
        max(n_split, 1),
        n_slots,
        float(scaling),
        layer.keep,
        layer.head_k,
        layer.head_v,
        layer.ring_k,
        layer.ring_v,
        layer.sum_index,
        sums,
        max(layer.num_sum_heads, 1),
        layer.sink,
        layer.recent,
        layer.window,
    ]
    shapes = dict(
        HQ=hq,
        HKV=hkv,
        N_REP=n_rep,
        REP_P=pd._pow2(n_rep),
        D=d,
        D_P=pd._pow2(d),
        DV=dv,
        DV_P=pd._pow2(dv),
        HW_BLOCK=32 if hw_f32 else 64,
        HW_DOT_F32=hw_f32,
        BLOCK=block,
        DOT_F32=dot_f32,
    )
    per_launch = pd.GROUPS_PER_LAUNCH
    launches = [groups[i : i + per_launch] for i in range(0, len(groups), per_launch)] if n_split else []
    for first, part in enumerate(launches or [[]]):
        args, counts = [], []
        for g in part:
            args += [g.channels, g.heads, g.keys, g.values, len(g.heads), g.keys.stride(1), g.values.stride(1)]
            counts.append(g.count)
        items = b * hkv * (first == 0) + b * sum(len(g.heads) for g in part) * n_split
        pad = per_launch - len(part)  # unused group slots: never read (NG stops them)
        args += [layer.sum_index, layer.sum_index, query, query, 1, 0, 0] * pad
        counts += [0] * pad
        _static_partials_kernel[(items,)](
            *common,
            *args,
            **shapes,
            HAS_HW=first == 0,
            NG=len(part),
            **{f"C{i}": c for i, c in enumerate(counts)},
            **{f"CP{i}": pd._pow2(c) for i, c in enumerate(counts)},
            num_warps=tuned["NUM_WARPS"],
            num_stages=stages,
        )
    out = torch.empty(b, 1, hq, dv, dtype=query.dtype, device=dev)
    has_mid = int(layer.capacity > 0 and (n_split > 0 or layer.num_sum_heads > 0))
    pd._merge_kernel[(b * hq,)](
        m_buf,
        acc_buf,
        out,
        layer.sum_index,
        max(n_split, 1),
        has_mid,
        n_slots,
        HKV=hkv,
        N_REP=n_rep,
        DV=dv,
        DV_P=pd._pow2(dv, 2),
        SB=16,
        num_warps=4,
    )
    return out


def static_append(layer, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor) -> None:
    """Token lengths[row] enters `layer` (evicting the slot it replaces); CUDA: one Triton launch."""
    if triton is not None and key.is_cuda:
        _append_triton(layer, key, value, lengths)
    else:
        static_append_torch(layer, key, value, lengths)


def static_decode_attention(
    query: torch.Tensor, layer, lengths: torch.Tensor, *, scaling: float, split: int | None = None
) -> torch.Tensor:
    """Decode attention of query (B, Hq, 1, d) over `layer` after `static_append`; (B, 1, Hq, dv).
    `split`: the middle's splits per (row, KV head) (default: from the GPU's size and the capacity)."""
    if triton is not None and query.is_cuda:
        return _attention_triton(query, layer, lengths, scaling=scaling, split=split)
    return static_decode_attention_torch(query, layer, lengths, scaling=scaling)
