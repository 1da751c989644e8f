"""Launch settings per GPU and shape class: user cache over the shipped table over defaults, and a
sweep's override over all of them."""

from __future__ import annotations

import json

import torch

from harness.kernels import launch_settings as ls

KERNEL = "pruned_decode"


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv(ls.ENV, str(tmp_path / "user.json"))
    ls.forget()
    shipped = json.loads(ls.SHIPPED.read_text())
    for gpu, classes in shipped[KERNEL].items():  # the shipped table names real GPUs and both plain classes
        assert {"long", "short"} <= set(classes)
        assert all(c in ("long", "short") or c.startswith(("long, head dim", "short, head dim")) for c in classes)
        assert ls.source(KERNEL, gpu, "long") == "shipped table"
        assert ls.settings(KERNEL, gpu, "long") == {**ls.DEFAULTS[KERNEL], **classes["long"]["settings"]}
    assert ls.settings(KERNEL, "Some GPU", "short") == ls.DEFAULTS[KERNEL]
    assert ls.source(KERNEL, "Some GPU", "short") == "defaults"
    path = ls.save(KERNEL, "Some GPU", "short", {"BLOCK_N": 64, "ITEMS_PER_SM": 16}, note="a sweep")
    assert (
        path == tmp_path / "user.json"
        and json.loads(path.read_text())[KERNEL]["Some GPU"]["short"]["note"] == "a sweep"
    )
    assert ls.settings(KERNEL, "Some GPU", "short") == {**ls.DEFAULTS[KERNEL], "BLOCK_N": 64, "ITEMS_PER_SM": 16}
    assert ls.settings(KERNEL, "Some GPU", "long") == ls.DEFAULTS[KERNEL]  # per shape class
    ls.OVERRIDE[KERNEL] = {"NUM_WARPS": 8}
    try:
        assert (
            ls.settings(KERNEL, "Some GPU", "short")["NUM_WARPS"] == 8 and ls.source(KERNEL, "x", "long") == "override"
        )
    finally:
        ls.OVERRIDE.pop(KERNEL)
    (tmp_path / "user.json").write_text("not json")
    ls.forget()
    assert ls.settings(KERNEL, "Some GPU", "short") == ls.DEFAULTS[KERNEL]  # a broken cache is ignored
    ls.forget()


def test_shape_class():
    assert ls.shape_class(32768) == "long" and ls.shape_class(4000) == "short"
    assert ls.shape_class(4000, 64) == "short" and ls.shape_class(4000, 128) == "short"
    assert ls.shape_class(2048, 256) == "short, head dim 256" and ls.shape_class(32768, 256) == "long, head dim 256"


def test_wide_heads_read_their_own_class(tmp_path, monkeypatch):
    """The static decode kernel of a 256-wide layer launches with its class's settings; a
    128-wide layer keeps the plain class's."""
    from harness.kcache import KeyChannelPlan
    from harness.kernels.static_decode import split_count
    from harness.static_kcache import StaticKLayer

    monkeypatch.setenv(ls.ENV, str(tmp_path / "user.json"))
    ls.save(KERNEL, "cpu", "short, head dim 256", {"BLOCK_N": 32, "NUM_WARPS": 8})
    try:
        for d, block in ((256, 32), (128, ls.DEFAULTS[KERNEL]["BLOCK_N"])):
            plan = KeyChannelPlan(2, d, d, tuple(tuple(range(d // 2)) for _ in range(2)), sink=4, recent=4)
            _, tuned = split_count(StaticKLayer(plan, 2, 512, torch.float32, "cpu"), 2, "cpu")
            assert tuned["BLOCK_N"] == block, d
    finally:
        ls.forget()
