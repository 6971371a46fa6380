"""``python -m mmalign.embedded.regression_gap``: the shipped SD3's denoising loss on real vs own samples."""
import re
from pathlib import Path

import pytest

from mmalign.embedded import regression_gap as rg

SD3 = Path(__file__).resolve().parents[2] / "assets" / "shapeworld-sd3"


@pytest.mark.skipif(not (SD3 / "model_index.json").is_file(), reason="assets/shapeworld-sd3 is missing")
def test_prints_one_finite_loss_per_source(capsys):
    assert rg.main(["--model", str(SD3), "--n", "3", "--draws", "1", "--steps", "2", "--guidance", "1", "4"]) == 0
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"\s(\d+\.\d{4})\s+\(SE", out)]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses), out
    assert "rendered ShapeWorld images" in out and "own ODE samples, CFG 4" in out


def test_bad_arguments():
    with pytest.raises(SystemExit):
        rg.main(["--n", "0"])
