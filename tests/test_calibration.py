"""Calibration sources: the embedded corpus, a text file, a Hugging Face dataset (on disk)."""

import pytest
import torch

from harness.calibration import CalibrationSpec, calibration_batches
from harness.errors import HarnessError
from harness.zoo import default_path

SENTENCE = "The quick brown fox jumps over the lazy dog while the calibration window slides along. "


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_path("deltanet-tiny"))


def test_default_corpus_windows_are_deterministic(tokenizer):
    spec = CalibrationSpec(samples=3, seq_len=32, seed=4)
    a, b = calibration_batches(tokenizer, spec, batch_size=2), calibration_batches(tokenizer, spec, batch_size=2)
    assert [t.shape for t in a] == [(2, 32), (1, 32)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = calibration_batches(tokenizer, CalibrationSpec(samples=3, seq_len=32, seed=5))
    assert not torch.equal(torch.cat(a), torch.cat(other))


def test_text_file_and_dataset_sources(tokenizer, tmp_path):
    import datasets

    (tmp_path / "calib.txt").write_text(SENTENCE * 200)
    from_file = calibration_batches(
        tokenizer, CalibrationSpec(samples=2, seq_len=16, text_file=str(tmp_path / "calib.txt"))
    )
    datasets.Dataset.from_dict({"body": [SENTENCE * 20] * 10, "id": list(range(10))}).save_to_disk(tmp_path / "ds")
    spec = CalibrationSpec(samples=2, seq_len=16, dataset=str(tmp_path / "ds"), column="body")
    from_dataset = calibration_batches(tokenizer, spec)
    words = set(SENTENCE.replace(".", "").split())
    for batches in (from_file, from_dataset):
        ids = torch.cat(batches)
        assert ids.shape == (2, 16)
        for row in ids:  # windows come from that text: inner words (edges may be cut) are its words
            inner = tokenizer.decode(row).replace(".", "").split()[1:-1]
            assert inner and set(inner) <= words
    assert spec.key()["dataset"] == str(tmp_path / "ds") and spec.key()["column"] == "body"


def test_calibration_errors(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["x" * 5000]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(HarnessError, match="no column 'text'; its columns: body"):
        CalibrationSpec(dataset=str(tmp_path / "ds")).text()
    with pytest.raises(HarnessError, match="either a calibration text file or a dataset"):
        CalibrationSpec(text_file="a.txt", dataset="b")
    with pytest.raises(HarnessError, match="does not exist"):
        CalibrationSpec(text_file=str(tmp_path / "missing.txt")).text()
