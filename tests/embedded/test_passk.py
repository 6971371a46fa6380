"""pass@k over an eval report: the estimator against hand-computed values, the per-category table."""
import json

import pytest

from mmalign.embedded.passk import main, pass_at_k, pass_at_k_table


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)/C(4,2) pairs miss the one success
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_table_per_category_and_bad_input(tmp_path, capsys):
    samples = [{"category": "a", "prompt": "p", "s": v} for v in (1, 0, 0, 0)] + \
              [{"category": "b", "prompt": "q", "s": v} for v in (0, 0, 0, 0)]
    t = pass_at_k_table(samples, "s", [1, 2, 8])
    assert t["a"] == {"prompts": 1, "pass@1": 0.25, "pass@2": pytest.approx(0.5)}  # k=8 > 4 samples: left out
    assert t["overall"]["pass@1"] == pytest.approx(0.125) and list(t)[-1] == "overall"
    with pytest.raises(ValueError, match="must be 0 or 1"):
        pass_at_k_table([{"category": "a", "prompt": "p", "s": 0.5}], "s", [1])
    with pytest.raises(ValueError, match="has no 'x'"):
        pass_at_k_table(samples, "x", [1])
    (tmp_path / "r.json").write_text(json.dumps({"samples": samples}))
    assert main([str(tmp_path / "r.json"), "--key", "s", "--k", "1,2"]) == 0
    assert "overall        prompts    2  pass@1 0.125  pass@2 0.250" in capsys.readouterr().out
