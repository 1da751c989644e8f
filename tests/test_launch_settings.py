"""Launch settings per GPU and shape class: user cache over the shipped table over defaults, and a
sweep's override over all of them."""

from __future__ import annotations

import json

from harness.kernels import launch_settings as ls

KERNEL = "pruned_decode"


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv(ls.ENV, str(tmp_path / "user.json"))
    ls.forget()
    shipped = json.loads(ls.SHIPPED.read_text())
    for gpu, classes in shipped[KERNEL].items():  # the shipped table names real GPUs and both classes
        assert set(classes) == {"long", "short"}
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
