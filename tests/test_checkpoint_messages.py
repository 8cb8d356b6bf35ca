"""A vqkit checkpoint cut short (a half-written copy, an interrupted download) is called
truncated, not "not a vqkit checkpoint"; a file that never was one keeps that message."""
from __future__ import annotations

import pytest
import torch

from vqkit.cli import main
from vqkit.errors import VqkitError
from vqkit.train import checkpoint as ckpt


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.95])
def test_a_truncated_checkpoint_is_called_truncated(tmp_path, capsys, fraction):
    path = tmp_path / "final.pt"
    ckpt.save_checkpoint(path, {"format": 2, "model": {"w": torch.arange(5000.0)}, "step": 3})
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(VqkitError) as info:
        ckpt.load_checkpoint(cut)
    assert str(info.value) == (
        f"{cut} is truncated or damaged: a PyTorch checkpoint archive cut short ({cut.stat().st_size} bytes, "
        "no end of archive; e.g. a copy or download that did not finish)")
    assert main(["eval", str(cut)]) == 2
    assert capsys.readouterr().err.strip() == f"vqkit: error: {info.value}"


def test_other_files_are_still_not_a_checkpoint(tmp_path):
    for content in (b"hello world\n", b"PK\x03\x04 not really a zip"):
        path = tmp_path / "notes.pt"
        path.write_bytes(content)
        with pytest.raises(VqkitError, match="is not a vqkit checkpoint"):
            ckpt.load_checkpoint(path)
