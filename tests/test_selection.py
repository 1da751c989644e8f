import pytest

from harness.selection import ChannelSelection, LayerSelection


def make(kept=((0, 2), (1, 3))):
    return ChannelSelection("deltanet", {0: LayerSelection(4, 8, kept), 1: LayerSelection(4, 8, kept)}, "x", 0.5)


def test_kept_ratio_and_state_bytes():
    sel = make()
    assert sel.kept_ratio == 0.5
    dense, pruned = sel.state_bytes(bytes_per_elem=4, batch=3)
    assert dense == 2 * 2 * 4 * 8 * 4 * 3  # layers * heads * d_k * d_v * bytes * batch
    assert pruned == dense // 2


def test_json_round_trip_and_digest():
    sel = make()
    again = ChannelSelection.from_json(sel.to_json())
    assert again == sel and again.digest == sel.digest
    other = make(((0, 1), (1, 3)))
    assert other.digest != sel.digest
    # diagnostics do not change identity
    assert ChannelSelection(sel.family, sel.layers, sel.method, sel.ratio, {"t": 1}).digest == sel.digest


def test_full_selection_keeps_everything(tmp_path):
    full = ChannelSelection.full("deltanet", {0: (2, 4, 8)})
    assert full.kept_ratio == 1.0
    assert full.layers[0].flat_indices().tolist() == list(range(8))
    assert ChannelSelection.load(full.save(tmp_path / "s.json")) == full


def test_invalid_indices_rejected():
    with pytest.raises(ValueError):
        LayerSelection(4, 8, ((2, 1),))
    with pytest.raises(ValueError):
        LayerSelection(4, 8, ((0, 4),))
    with pytest.raises(ValueError, match="schema"):
        ChannelSelection.from_dict({"schema": "other"})
