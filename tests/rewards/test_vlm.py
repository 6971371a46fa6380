"""VLM answer-token rewards (vqascore, vlm_compare, qalign, artifacts, video_vlm) on tiny random Qwen2-VL.

Each score is checked against its formula computed from a direct call of the model on inputs built by
the official transformers processor (Qwen2VLProcessor with its image/video processors), so the pure-torch
preprocessing, the chat prompt, the shared vision features and the answer-position read are all covered.
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch

from mmalign.rewards.artifacts import ARTIFACT_TAXONOMY, select_taxonomy, worst_categories
from mmalign.rewards.vlm import (
    QwenVisionPreprocess,
    VLMQuery,
    load_vqascore,
    qwen_patchify,
    uniform_frame_indices,
    yes_probability,
)
from mmalign.testing import tiny_reward
from mmalign.testing.vlm import (
    TINY_MAX_PIXELS,
    TINY_MERGE_SIZE,
    TINY_MIN_PIXELS,
    TINY_PATCH_SIZE,
    TINY_TEMPORAL_PATCH_SIZE,
    tiny_image_processor,
    tiny_qwen_vl,
    tiny_vlm_tokenizer,
)

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"  # the processor expands <|image_pad|> to the image's tokens


def _user(content: str, answer_prefix: str = "") -> str:
    return f"{SYSTEM}<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n{answer_prefix}"


def _uint8_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    """N,H,W,3 uint8 -> N,3,H,W float in [0,1] (the same pixels the processor sees)."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def processor():
    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

    video = Qwen2VLVideoProcessor(patch_size=TINY_PATCH_SIZE, merge_size=TINY_MERGE_SIZE, temporal_patch_size=TINY_TEMPORAL_PATCH_SIZE,
                                  min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    return Qwen2VLProcessor(image_processor=tiny_image_processor(), tokenizer=tiny_vlm_tokenizer(), video_processor=video)


def _direct_logits(model, processor, texts, images=None, videos=None) -> torch.Tensor:
    """Answer-position logits from ``model(**processor(...))`` (one row per text, left to right)."""
    rows = []
    img_iter = iter(images or [])
    for text in texts:
        n_img = text.count("<|image_pad|>")
        imgs = [next(img_iter) for _ in range(n_img)]
        kwargs = {}
        if imgs:
            kwargs["images"] = imgs
        if videos is not None:
            kwargs["videos"] = [videos.pop(0)]
            kwargs["videos_kwargs"] = {"do_sample_frames": False, "cap_pixels_per_frame": False}
        inputs = processor(text=[text], return_tensors="pt", **kwargs)
        with torch.no_grad():
            rows.append(model(**inputs).logits[0, -1].float())
    return torch.stack(rows)


def _tok_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


# ----------------------------------------------------------------------------- preprocessing
def test_patchify_matches_official_image_processor():
    arr = _uint8_images(2, 32, 24)  # already within the budget and multiples of patch * merge
    official = tiny_image_processor()(images=list(arr), return_tensors="pt")
    prep = QwenVisionPreprocess(patch_size=TINY_PATCH_SIZE, merge_size=TINY_MERGE_SIZE, temporal_patch_size=TINY_TEMPORAL_PATCH_SIZE,
                                max_pixels=TINY_MAX_PIXELS, min_pixels=TINY_MIN_PIXELS)
    pv, grid = prep(_as_tensor(arr))
    assert torch.equal(grid, official["image_grid_thw"])
    torch.testing.assert_close(pv, official["pixel_values"], atol=1e-5, rtol=0)


def test_patchify_matches_official_video_processor_with_odd_frames():
    from transformers import Qwen2VLVideoProcessor

    vp = Qwen2VLVideoProcessor(patch_size=TINY_PATCH_SIZE, merge_size=TINY_MERGE_SIZE, temporal_patch_size=TINY_TEMPORAL_PATCH_SIZE,
                               min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    clip = _uint8_images(5, 32, 24, seed=1)  # 5 frames: padded to 6 by repeating the last
    official = vp(videos=[clip], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False)
    prep = QwenVisionPreprocess(patch_size=TINY_PATCH_SIZE, merge_size=TINY_MERGE_SIZE, max_pixels=TINY_MAX_PIXELS, min_pixels=TINY_MIN_PIXELS)
    pv, grid = prep(_as_tensor(clip)[None])
    assert grid.tolist() == official["video_grid_thw"].tolist() == [[3, 8, 6]]
    torch.testing.assert_close(pv, official["pixel_values_videos"], atol=1e-5, rtol=0)


def test_pixel_budget_resize_and_patchify_are_differentiable():
    prep = QwenVisionPreprocess(patch_size=4, merge_size=2, max_pixels=32 * 32, min_pixels=64)
    x = torch.rand(2, 3, 96, 64, requires_grad=True)
    pv, grid = prep(x)
    h, w = grid[0, 1].item() * 4, grid[0, 2].item() * 4
    assert h % 8 == 0 and w % 8 == 0 and h * w <= 32 * 32 and abs(h / w - 1.5) < 0.35
    pv.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple"):
        qwen_patchify(torch.rand(1, 3, 30, 32), 4, 2, 2)


# ----------------------------------------------------------------------------- vqascore
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("normalize", ["vocab", "yes_no"])
def test_vqascore_matches_direct_model_call(processor, arch, normalize):
    model, tok = tiny_qwen_vl(0, arch=arch)
    reward = load_vqascore(model=model, tokenizer=tok, max_pixels=TINY_MAX_PIXELS, min_pixels=TINY_MIN_PIXELS, normalize=normalize)
    arr = _uint8_images(3, seed=2)
    prompts = ["a red cube", "a cat on a chair", "three green triangles"]
    out = reward(_as_tensor(arr), prompts)
    texts = [_user(IMG + f'Does this figure show "{p}"? Please answer yes or no.') for p in prompts]
    logits = _direct_logits(model, processor, texts, images=list(arr))
    yes, no = _tok_id(tok, "Yes"), _tok_id(tok, "No")
    if normalize == "vocab":
        want = logits.softmax(-1)[:, yes]
    else:
        want = torch.softmax(logits[:, [yes, no]], -1)[:, 0]
    assert out.all_valid and out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.components["p_yes"], out.scores)
    assert out.provenance["reward"] == "vqascore" and out.provenance["weights"]  # a pre-built model: its config name or class
    assert out.provenance["preprocessing"]["vision"]["policy"] == "pixel_budget"


def test_yes_probability_formula():
    logits = torch.randn(4, 10)
    p, q = yes_probability(logits, [1, 2], [3], "vocab")
    sm = logits.softmax(-1)
    torch.testing.assert_close(p, sm[:, 1] + sm[:, 2])
    torch.testing.assert_close(q, sm[:, 3])
    p, q = yes_probability(logits, [1], [3], "yes_no")
    torch.testing.assert_close(p, torch.sigmoid(logits[:, 1] - logits[:, 3]))
    torch.testing.assert_close(p + q, torch.ones(4))


def test_batch_of_one_equals_batch_of_four_and_shared_vision_equals_pixels():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["a red cube", "a dog", "an astronaut riding a horse on the moon", "a bowl of fruit"]
    r1 = tiny_reward("vqascore", batch_size=1)
    r4 = tiny_reward("vqascore", batch_size=4)
    one, four = r1(x, prompts).scores, r4(x, prompts).scores
    torch.testing.assert_close(one, four, atol=1e-5, rtol=0)
    # mixed prompts are scored against their own prompts
    for i in range(4):
        torch.testing.assert_close(r1(x[i : i + 1], [prompts[i]]).scores, four[i : i + 1], atol=1e-5, rtol=0)
    assert len(set(four.tolist())) == 4
    # the same image under a different prompt gets a different score
    assert not torch.allclose(r4(x[:1], ["a dog"]).scores, four[:1])
    # encoding each image once (mm_encoder_outputs) == passing the pixels with every question
    unshared = tiny_reward("vqascore", share_vision=False)
    torch.testing.assert_close(unshared(x, prompts).scores, four, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vqascore", "vlm_compare", "qalign", "artifacts", "video_vlm"])
def test_gradients_reach_pixels(name):
    reward = tiny_reward(name, normalize="yes_no") if name != "qalign" else tiny_reward(name)
    g = torch.Generator().manual_seed(4)
    shape = (2, 5, 3, 32, 32) if name == "video_vlm" else (2, 3, 32, 32)
    x = torch.rand(shape, generator=g).requires_grad_(True)
    kwargs = {}
    if name == "vlm_compare":
        kwargs["references"] = torch.rand(2, 3, 32, 32, generator=g)
    prompts = ["a red cube", "a cat"] if "prompt" in reward.needs else None
    out = reward(x, prompts, **kwargs)
    assert out.scores.requires_grad
    out.scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert reward.differentiable
    # without requires_grad nothing is tracked
    assert not reward(x.detach(), prompts, **kwargs).scores.requires_grad


def test_invalid_items():
    reward = tiny_reward("vqascore")
    x = torch.rand(3, 3, 32, 32)
    x[1, 0, 0, 0] = math.nan
    out = reward(x, ["a cube", "a cube", "  "])
    assert out.valid.tolist() == [True, False, False]
    assert math.isfinite(out.scores[0]) and math.isnan(out.scores[1]) and math.isnan(out.scores[2])
    assert "non-finite" in out.reasons[1] and out.reasons[2] == "empty prompt"
    with pytest.raises(ValueError, match="needs prompts"):
        reward(x[:1])
    compare = tiny_reward("vlm_compare")
    with pytest.raises(ValueError, match="reference"):
        compare(torch.rand(2, 3, 32, 32), ["a", "b"])
    refs = torch.rand(2, 3, 32, 32)
    refs[0] = math.nan
    out = compare(torch.rand(2, 3, 32, 32), ["a cube", "a cat"], references=refs)
    assert out.valid.tolist() == [False, True] and out.reasons[0].startswith("reference")


def test_mixed_sizes_and_long_prompts():
    reward = tiny_reward("vqascore")
    small, big = torch.rand(3, 32, 32), torch.rand(3, 64, 64)
    out = reward([small, big], ["a cube", "a cube"])  # same aspect: both resized to the 32x32 budget
    assert out.all_valid
    big_alone = reward(big[None], ["a cube"]).scores
    torch.testing.assert_close(out.scores[1:], big_alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="aspect"):
        reward([small, torch.rand(3, 32, 64)], ["a", "b"])
    short = tiny_reward("vqascore", max_prompt_tokens=6)
    with pytest.warns(UserWarning, match="token limit"):
        out = short(torch.rand(1, 3, 32, 32), ["a very long prompt about an astronaut riding a horse on the moon"])
    assert out.all_valid
    with pytest.warns(UserWarning, match="special tokens"):
        out = reward(torch.rand(1, 3, 32, 32), ["a cube <|image_pad|>"])
    assert out.all_valid


def test_model_dtype_bfloat16_scores_float32():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a cube", "a dog"]
    low = tiny_reward("vqascore", dtype="bfloat16", normalize="yes_no")
    assert next(low.core.model.parameters()).dtype == torch.bfloat16
    out = low(x, prompts)
    assert out.scores.dtype == torch.float32 and out.all_valid
    full = tiny_reward("vqascore", normalize="yes_no")(x, prompts)
    torch.testing.assert_close(out.scores, full.scores, atol=0.05, rtol=0)


# ----------------------------------------------------------------------------- vlm_compare
def test_vlm_compare_matches_direct_model_call(processor):
    reward = tiny_reward("vlm_compare", criteria=["aesthetics", "detail"], normalize="yes_no", swap=True)
    model, tok = reward.core.model, reward.core.tokenizer
    samples, refs = _uint8_images(2, seed=5), _uint8_images(2, seed=6)
    prompts = ["a red cube", "a cat"]
    out = reward(_as_tensor(samples), prompts, references=_as_tensor(refs))
    q = [f'Both pictures were generated for the prompt "{p}". Is Picture 1 better than Picture 2 in terms of aesthetics and detail? '
         "Please answer yes or no." for p in prompts]
    first = _direct_logits(model, processor, [_user(f"Picture 1: {IMG}Picture 2: {IMG}" + t) for t in q],
                           images=[samples[0], refs[0], samples[1], refs[1]])
    swapped = _direct_logits(model, processor, [_user(f"Picture 1: {IMG}Picture 2: {IMG}" + t) for t in q],
                             images=[refs[0], samples[0], refs[1], samples[1]])
    yes, no = _tok_id(tok, "Yes"), _tok_id(tok, "No")
    p1 = torch.softmax(first[:, [yes, no]], -1)[:, 0]
    p2 = torch.softmax(swapped[:, [yes, no]], -1)[:, 0]
    torch.testing.assert_close(out.components["p_yes"], p1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.components["p_yes_swapped"], p2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.scores, 0.5 * (p1 + 1 - p2), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- qalign
def test_qalign_matches_direct_model_call(processor):
    reward = tiny_reward("qalign")
    model, tok = reward.core.model, reward.core.tokenizer
    arr = _uint8_images(2, seed=7)
    out = reward(_as_tensor(arr))  # no prompt needed
    logits = _direct_logits(model, processor, [_user(IMG + "How would you rate the quality of this image?", "The quality of the image is")] * 2,
                            images=list(arr))
    words = ["excellent", "good", "fair", "poor", "bad"]
    ids = [_tok_id(tok, " " + w) for w in words]
    probs = logits[:, ids].softmax(-1)
    want = probs @ torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    torch.testing.assert_close(out.scores, want, atol=1e-5, rtol=1e-4)
    for j, w in enumerate(words):
        torch.testing.assert_close(out.components[f"p_{w}"], probs[:, j], atol=1e-5, rtol=1e-4)
    assert 0 <= out.scores.min() and out.scores.max() <= 1
    with pytest.raises(ValueError, match="single token"):
        tiny_reward("qalign", levels={"excellent": 1.0, "supercalifragilistic": 0.0})


# ----------------------------------------------------------------------------- artifacts
def test_artifact_components_and_worst_categories(processor):
    cats = {"anatomy/hands": ARTIFACT_TAXONOMY["anatomy/hands"], "text/rendering": ARTIFACT_TAXONOMY["text/rendering"],
            "custom/blobs": "Does this image contain random blobs?"}
    reward = tiny_reward("artifacts", taxonomy=cats, normalize="yes_no", max_sequences=2)
    model, tok = reward.core.model, reward.core.tokenizer
    arr = _uint8_images(2, seed=8)
    out = reward(_as_tensor(arr))
    yes, no = _tok_id(tok, "Yes"), _tok_id(tok, "No")
    texts, images = [], []
    for i in range(2):
        for q in cats.values():
            texts.append(_user(IMG + q + " Please answer yes or no."))
            images.append(arr[i])
    flaws = torch.softmax(_direct_logits(model, processor, texts, images=images)[:, [yes, no]], -1)[:, 0].reshape(2, 3)
    for j, label in enumerate(cats):
        torch.testing.assert_close(out.components[label], flaws[:, j], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.components["p_flaw"], flaws, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.scores, 1 - flaws.max(1).values, atol=1e-5, rtol=1e-4)
    assert out.provenance["categories"] == list(cats)

    worst = worst_categories(out, k=2)
    for i in range(2):
        order = [list(cats)[j] for j in flaws[i].argsort(descending=True).tolist()]
        assert worst[i] == order[:2]
    assert reward.worst_categories(out, k=1, with_probs=True)[0][0][0] == worst[0][0]
    assert worst_categories(out, k=3, threshold=2.0) == [[], []]

    mean = tiny_reward("artifacts", taxonomy=cats, normalize="yes_no", aggregate="mean", weights={"custom/blobs": 2.0})
    w = torch.tensor([1.0, 1.0, 2.0])
    torch.testing.assert_close(mean(_as_tensor(arr)).scores, 1 - (flaws * w).sum(1) / w.sum(), atol=1e-5, rtol=1e-4)

    # invalid items get no labels
    x = _as_tensor(arr).clone()
    x[0] = math.nan
    assert worst_categories(reward(x), k=2)[0] == []


def test_artifact_taxonomy_selection():
    anatomy = select_taxonomy(categories=["anatomy"])
    assert set(anatomy) == {k for k in ARTIFACT_TAXONOMY if k.startswith("anatomy/")} and "anatomy/hands" in anatomy
    groups = {k.split("/")[0] for k in ARTIFACT_TAXONOMY}
    assert {"anatomy", "structure", "texture", "text", "physics"} <= groups
    sel = select_taxonomy(categories=["text/rendering"], extra_categories={"style/oversaturated": "Is this image oversaturated?"})
    assert list(sel) == ["text/rendering", "style/oversaturated"]
    with pytest.raises(ValueError, match="unknown artifact category"):
        select_taxonomy(categories=["nope"])
    with pytest.raises(ValueError, match="aggregate"):
        tiny_reward("artifacts", aggregate="median")
    reward = tiny_reward("artifacts", categories=["anatomy/hands", "physics"])
    out = reward(torch.rand(1, 3, 32, 32))
    assert out.provenance["categories"] == ["anatomy/hands", "physics/lighting"] and out.components["p_flaw"].shape == (1, 2)


# ----------------------------------------------------------------------------- video_vlm
def test_video_vlm_modes_match_their_formulas(processor):
    clip = _uint8_images(7, seed=9)  # T = 7 frames
    video = _as_tensor(clip)[None]
    prompt = ["a dog running in the park"]
    assert uniform_frame_indices(7, 4) == [0, 2, 4, 6] and uniform_frame_indices(3, 8) == [0, 1, 2]

    # per-frame mode = mean of vqascore over the sampled frames
    per_frame = tiny_reward("video_vlm", mode="per_frame", num_frames=3)
    out = per_frame(video, prompt)
    vqa = tiny_reward("vqascore")(_as_tensor(clip[[0, 3, 6]]), prompt * 3).scores
    torch.testing.assert_close(out.components["p_yes_frames"][0], vqa, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.scores[0], vqa.mean(), atol=1e-5, rtol=1e-4)

    # images mode: the frames as Picture 1..k in one prompt; custom frame-index function
    images = tiny_reward("video_vlm", frame_indices=lambda t, fps: [1, 5])
    model, tok = images.core.model, images.core.tokenizer
    out = images(video, prompt)
    text = _user(f"Picture 1: {IMG}Picture 2: {IMG}" + 'Does this video show "a dog running in the park"? Please answer yes or no.')
    logits = _direct_logits(model, processor, [text], images=[clip[1], clip[5]])
    torch.testing.assert_close(out.scores, logits.softmax(-1)[:, _tok_id(tok, "Yes")], atol=1e-5, rtol=1e-4)

    # video mode: Qwen's native video input (4 frames -> temporal grid 2)
    vid = tiny_reward("video_vlm", mode="video", num_frames=4)
    out = vid(video, prompt)
    text = _user("<|vision_start|><|video_pad|><|vision_end|>" + 'Does this video show "a dog running in the park"? Please answer yes or no.')
    logits = _direct_logits(model, processor, [text], videos=[clip[[0, 2, 4, 6]]])
    torch.testing.assert_close(out.scores, logits.softmax(-1)[:, _tok_id(tok, "Yes")], atol=1e-5, rtol=1e-4)

    with pytest.raises(ValueError, match="out of range"):
        tiny_reward("video_vlm", frame_indices=lambda t, fps: [t])(video, prompt)
    with pytest.raises(ValueError, match="mode"):
        tiny_reward("video_vlm", mode="gif")


def test_video_vlm_batch_and_qwen25_video():
    reward = tiny_reward("video_vlm", arch="qwen2_5_vl", mode="video", num_frames=4, batch_size=1)
    x = torch.rand(3, 6, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    prompts = ["a dog", "a cat", "a car"]
    one = reward(x, prompts, fps=8.0).scores
    reward.batch_size = 3
    torch.testing.assert_close(reward(x, prompts, fps=8.0).scores, one, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- loading
def test_published_id_offline_fails_fast_with_oserror(tmp_path):
    start = time.perf_counter()
    with pytest.raises(OSError, match="Qwen/Qwen2.5-VL-7B-Instruct.*offline"):
        load_vqascore(offline=True, cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 20


def test_registry_and_tiny_builders_point_here():
    from mmalign.rewards import REWARDS
    from mmalign.rewards import vlm
    from mmalign.rewards.artifacts import load_artifacts

    for name, fn in [("vqascore", vlm.load_vqascore), ("vlm_compare", vlm.load_vlm_compare), ("qalign", vlm.load_qalign),
                     ("video_vlm", vlm.load_video_vlm), ("artifacts", load_artifacts)]:
        assert REWARDS.get(name) is fn
        assert tiny_reward(name).name == name


def test_mismatched_tokenizer_is_rejected():
    model, _ = tiny_qwen_vl(0)
    with pytest.raises(ValueError, match="tokenizer"):
        load_vqascore(model=model)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")), unk_token="<unk>")
    with pytest.raises(ValueError, match="mismatched tokenizer"):
        load_vqascore(model=model, tokenizer=bare)


def test_core_rejects_empty_queries():
    reward = tiny_reward("vqascore")
    with pytest.raises(ValueError, match="no queries"):
        reward.core.answer_logits(torch.rand(1, 3, 32, 32), [])
    assert isinstance(VLMQuery((0,), "q"), VLMQuery)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reward(torch.rand(1, 3, 32, 32), ["a short prompt"])


def test_processor_supplies_tokenizer_and_pixel_budget(processor):
    model, _ = tiny_qwen_vl(0)
    reward = load_vqascore(model=model, processor=processor)
    assert reward.core.vision.max_pixels == TINY_MAX_PIXELS and reward.core.vision.min_pixels == TINY_MIN_PIXELS
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(reward(x, ["a cube", "a dog"]).scores, tiny_reward("vqascore")(x, ["a cube", "a dog"]).scores, atol=1e-6, rtol=0)
