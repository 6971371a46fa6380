"""Rule rewards: JPEG size / compressibility (DDPO) and verifiable rules."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.rewards import load_reward
from mmalign.rewards.rules import JpegSizeReward, VerifiableReward, load_verifiable
from mmalign.testing import tiny_reward
from mmalign.testing.media_rewards import mean_color_rule


def images(b=3, size=24, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def jpeg_kb_by_hand(img: torch.Tensor, quality: int = 95) -> float:
    arr = np.asarray((img.permute(1, 2, 0).numpy() * 255).round().clip(0, 255), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000


# ----------------------------------------------------------------------------- JPEG


def test_jpeg_size_equals_pil_bytes_by_hand():
    imgs = images()
    imgs[1] = 0.5  # a flat image compresses much better
    reward = tiny_reward("jpeg_size")
    assert isinstance(reward, JpegSizeReward) and reward.needs == frozenset() and not reward.differentiable
    out = reward(imgs)  # needs no prompts
    expected = torch.tensor([jpeg_kb_by_hand(i) for i in imgs])
    torch.testing.assert_close(out.scores, expected)
    torch.testing.assert_close(out.components["size_kb"], expected)
    assert out.scores[1] < out.scores[0]
    low = load_reward("jpeg_size", quality=30)(imgs).scores
    torch.testing.assert_close(low, torch.tensor([jpeg_kb_by_hand(i, 30) for i in imgs]))
    assert (low[[0, 2]] < out.scores[[0, 2]]).all()  # noisy images shrink at lower quality


def test_jpeg_compressibility_is_the_negation(tmp_path):
    imgs = images(seed=1)
    comp = tiny_reward("jpeg_compressibility")
    out = comp(imgs)
    size = tiny_reward("jpeg_size")(imgs)
    torch.testing.assert_close(out.scores, -size.scores)
    torch.testing.assert_close(out.components["size_kb"], size.scores)
    assert comp.name == "jpeg_compressibility" and comp.higher_is_better
    assert comp.provenance()["preprocessing"]["quality"] == 95
    path = tmp_path / "x.png"
    Image.fromarray((imgs[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    out = comp([str(path), str(bad)])
    assert out.valid.tolist() == [True, False] and out.reasons[1].startswith("unreadable image")
    torch.testing.assert_close(out.scores[0], -torch.tensor(jpeg_kb_by_hand(imgs[0])))
    with pytest.raises(ValueError):
        load_reward("jpeg_size", quality=0)
    with pytest.raises(TypeError):
        load_reward("jpeg_size", nonsense=1)


# ----------------------------------------------------------------------------- verifiable rules


def test_tiny_verifiable_mean_colour_rule_by_hand():
    reward = tiny_reward("verifiable")
    assert isinstance(reward, VerifiableReward) and "metadata" in reward.needs and not reward.differentiable
    imgs = images(b=2)
    imgs[1] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure red
    meta = [{"target_color": [0.5, 0.5, 0.5]}, {"target_color": [1.0, 0.0, 0.0], "tolerance": 0.01}]
    out = reward(imgs, metadata=meta)
    dist0 = float(torch.linalg.vector_norm(imgs[0].mean(dim=(1, 2)) - 0.5)) / math.sqrt(3)
    torch.testing.assert_close(out.scores, torch.tensor([1 - dist0, 1.0]))
    torch.testing.assert_close(out.components["distance"], torch.tensor([dist0, 0.0]))
    assert out.components["match"].tolist() == [float(dist0 <= 0.1), 1.0]
    with pytest.raises(ValueError, match="metadata"):
        reward(imgs)


def test_exceptions_and_bad_results_mark_items_invalid_with_reasons():
    def rule(sample, metadata):
        if metadata["kind"] == "raise":
            raise RuntimeError("the checker crashed")
        if metadata["kind"] == "none":
            return None
        if metadata["kind"] == "nan":
            return float("nan")
        if metadata["kind"] == "text":
            return "yes"
        return float(sample.mean()), {"bright": float(sample.mean() > 0.5)}

    reward = load_verifiable(fn=rule, name="checker")
    kinds = ["ok", "raise", "none", "nan", "text", "ok"]
    out = reward(images(b=6), metadata=[{"kind": k} for k in kinds])
    assert out.valid.tolist() == [True, False, False, False, False, True]
    assert out.reasons[1] == "rule raised RuntimeError: the checker crashed"
    assert "None" in out.reasons[2] and "non-finite" in out.reasons[3] and "unusable" in out.reasons[4]
    assert all(math.isnan(out.scores[i]) for i in range(1, 5))  # never a silent 0
    assert torch.isfinite(out.scores[[0, 5]]).all() and math.isnan(out.components["bright"][1])
    with pytest.raises(Exception, match="item 1: rule raised RuntimeError"):
        out.raise_if_invalid()


def test_batched_rules_prompts_and_other_modalities():
    seen = {}

    def batched(samples, metadatas, prompt=None):
        seen["prompts"] = prompt
        if any(m.get("boom") for m in metadatas):
            raise ValueError("bad chunk")
        return samples.mean(dim=(1, 2, 3))

    reward = load_verifiable(fn=batched, batched=True, needs=("metadata", "prompt"), batch_size=2)
    imgs = images(b=4)
    out = reward(imgs, ["a", "b", "c", "d"], metadata=[{}, {}, {"boom": True}, {}])
    assert out.valid.tolist() == [True, True, False, False]  # the chunk with the failure
    assert out.reasons[2] == out.reasons[3] == "rule raised ValueError: bad chunk"
    torch.testing.assert_close(out.scores[:2], imgs[:2].mean(dim=(1, 2, 3)))
    assert seen["prompts"] == ["c", "d"]
    assert reward(imgs[:1], [""], metadata=[{}]).reasons == ["empty prompt"]

    def per_item(sample, metadata, prompt):
        return float(len(prompt)) + metadata["offset"]

    out = load_verifiable(fn=per_item, needs=("metadata", "prompt"))(imgs[:2], ["ab", "abcd"], metadata=[{"offset": 1}, {"offset": 0}])
    assert out.scores.tolist() == [3.0, 4.0]

    video = load_verifiable(fn=mean_color_rule, modality="video")
    v = torch.full((1, 4, 3, 8, 8), 0.5)
    assert video(v, metadata=[{"target_color": (0.5, 0.5, 0.5)}]).scores.tolist() == [1.0]
    bad = video(v, metadata=[{"target_color": (2.0, 0.0)}])
    assert not bad.all_valid and "target_color" in bad.reasons[0]
    with pytest.raises(TypeError):
        load_reward("verifiable")
