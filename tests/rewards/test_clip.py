"""CLIP-family rewards (CLIPScore, PickScore, HPSv2/2.1, aesthetic, goal-baseline CLIP) on tiny random
weights, offline.

Each score is checked against its published formula computed by hand on the same weights: embeddings
from the model's own ``get_image_features`` / ``get_text_features`` (open_clip ``encode_image`` /
``encode_text``) on pixels preprocessed by hand, and preprocessing against open_clip's own transforms.
"""
from __future__ import annotations

import math
import socket
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmalign.rewards import REWARDS, load_reward
from mmalign.rewards.clip import (
    AestheticMLP,
    AestheticScore,
    CLIPScore,
    GoalBaselineCLIP,
    HPSv2,
    HPSv21,
    OpenClipBackbone,
    PickScore,
    load_aesthetic,
    load_clipscore,
)
from mmalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, warn_if_truncated
from mmalign.testing import tiny_reward
from mmalign.testing.clip_rewards import tiny_aesthetic_head, tiny_clip_model, tiny_open_clip_model
from mmalign.testing.components import TINY_CLIP_MERGES
from mmalign.testing.tokenizers import clip_tokenizer

NAMES = ["clipscore", "pickscore", "hpsv2", "hpsv2.1", "aesthetic", "goal_clip"]
PROMPTED = [n for n in NAMES if n != "aesthetic"]
CLASSES = {"clipscore": CLIPScore, "pickscore": PickScore, "hpsv2": HPSv2, "hpsv2.1": HPSv21,
           "aesthetic": AestheticScore, "goal_clip": GoalBaselineCLIP}
PROMPTS = ["a photo of a cat", "a red square on a blue background", "a dog running in the park", "two blue triangles",
           "sunset over the sea", "a car at night", "a bowl of fruit", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def rewards() -> dict:
    """One tiny reward per name (seed 0), shared by the read-only tests."""
    return {name: tiny_reward(name) for name in NAMES}


def _images(n: int = 8, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def _crop_by_hand(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """CLIP preprocessing written out: shortest edge to ``size`` (bicubic, antialiased), centre crop."""
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = round(h * s), round(w * s)
    y = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return _normalize(y[..., top : top + size, left : left + size])


def _pad_by_hand(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """HPS preprocessing written out: longest side to ``size``, zero (black) padding centred, then normalise."""
    h, w = x.shape[-2:]
    s = size / max(h, w)
    nh, nw = round(h * s), round(w * s)
    y = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    canvas = torch.zeros(x.shape[0], 3, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[..., top : top + nh, left : left + nw] = y
    return _normalize(canvas)


def _hf_embeddings(model, tok, pixels: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image / text embeddings straight from transformers' CLIPModel (padding to the longest
    prompt here, to the full context in the reward: the eos features must not depend on it)."""
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        enc = tok(prompts, padding=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


def _flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float() for p in module.parameters()])


def _scores(reward, x, prompts=PROMPTS) -> torch.Tensor:
    """Scores without gradients; the first len(x) prompts (a string is broadcast); none for aesthetic."""
    if reward.name == "aesthetic":
        prompts = None
    elif isinstance(prompts, list):
        prompts = prompts[: len(x)]
    with torch.no_grad():
        return reward(x, prompts).scores


# ----------------------------------------------------------------------------- registry and building
def test_registry_classes_and_attributes(rewards: dict) -> None:
    for name in NAMES:
        r = rewards[name]
        assert type(r) is CLASSES[name] and r.name == name
        assert name in REWARDS.names()
        assert r.differentiable and r.modality == "image" and r.higher_is_better
        assert r.needs == (frozenset() if name == "aesthetic" else frozenset({"prompt"}))
        prov = r.provenance()
        assert prov["weights"] == f"tiny:{name}(seed=0)"
        assert prov["preprocessing"]["policy"] == ("longest_side_pad" if name.startswith("hps") else "shortest_edge_crop")
        assert prov["preprocessing"]["size"] == 32 and tuple(prov["preprocessing"]["mean"]) == CLIP_MEAN
        assert all(not p.requires_grad for p in r.parameters()), f"{name}: reward weights must be frozen"
    # the registered factories take pre-built objects (what the tiny builders use)
    model, tok = tiny_clip_model(0)
    assert isinstance(load_reward("clipscore", model=model, tokenizer=tok), CLIPScore)
    with pytest.raises(ValueError, match="tokenizer"):
        load_clipscore(model=model)


def test_tiny_build_is_fast_seeded_and_private(rewards: dict) -> None:
    clip_tokenizer(TINY_CLIP_MERGES)  # cached per process
    state = torch.random.get_rng_state()
    for name in NAMES:
        start = time.perf_counter()
        r = tiny_reward(name, seed=0)
        assert time.perf_counter() - start < 1.0, f"tiny {name} took too long to build"
        assert torch.equal(_flat(r), _flat(rewards[name])), f"{name}: seed 0 not reproducible"
        assert not torch.equal(_flat(tiny_reward(name, seed=1)), _flat(r))
    assert torch.equal(torch.random.get_rng_state(), state), "building must not touch the caller's random stream"
    model, tok = tiny_clip_model(0)
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.vocab_size, text.eos_token_id, text.bos_token_id) == (len(tok), len(tok) - 1, tok.bos_token_id)
    assert text.pad_token_id == tok.pad_token_id
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (32, 8, 32)


# ----------------------------------------------------------------------------- the formulas
def test_clipscore_pickscore_formula(rewards: dict) -> None:
    x = _images()
    model, tok = tiny_clip_model(0)
    img, txt = _hf_embeddings(model, tok, _crop_by_hand(x), PROMPTS)
    cos = (img * txt).sum(-1)
    out = rewards["clipscore"](x, PROMPTS)
    torch.testing.assert_close(out.scores, torch.clamp(100 * cos, min=0), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.components["cosine"], cos, atol=1e-6, rtol=0)
    pick = rewards["pickscore"](x, PROMPTS)
    torch.testing.assert_close(pick.scores, model.logit_scale.detach().exp() * cos, atol=1e-5, rtol=0)
    # the clamp at 0: an image pushed away from its prompt scores 0, with the raw cosine kept
    neg = CLIPScore(rewards["clipscore"].backbone, preprocess=rewards["clipscore"].preprocess)
    with torch.no_grad():
        neg.backbone.model.visual_projection.weight.neg_()
    try:
        out = neg(x, PROMPTS)
        assert (out.components["cosine"] < 0).any()
        torch.testing.assert_close(out.scores, torch.clamp(100 * out.components["cosine"], min=0))
    finally:
        with torch.no_grad():
            neg.backbone.model.visual_projection.weight.neg_()


@pytest.mark.parametrize("name", ["hpsv2", "hpsv2.1"])
def test_hps_formula_longest_side_and_zero_pad(name: str, rewards: dict) -> None:
    x = _images(4, h=24, w=40)  # wide: resized to 19x32, then 6 + 7 rows of black padding
    model, tok = tiny_open_clip_model(0)
    pixels = _pad_by_hand(x)
    assert torch.allclose(pixels[:, :, :6], _normalize(torch.zeros(1, 3, 6, 32)))
    ids = torch.zeros(4, 77, dtype=torch.long)  # open_clip's layout: sot, tokens, eot, then 0s
    for i, p in enumerate(PROMPTS[:4]):
        t = tok(p)["input_ids"]
        ids[i, : len(t)] = torch.tensor(t)
    with torch.no_grad():
        expected = (model.encode_image(pixels, normalize=True) * model.encode_text(ids, normalize=True)).sum(-1)
    torch.testing.assert_close(rewards[name](x, PROMPTS[:4]).scores, expected, atol=1e-5, rtol=0)
    # a tall image pads left and right
    tall = _images(2, h=50, w=20, seed=3)
    with torch.no_grad():
        expected = (model.encode_image(_pad_by_hand(tall), normalize=True) * model.encode_text(ids[:2], normalize=True)).sum(-1)
    torch.testing.assert_close(rewards[name](tall, PROMPTS[:2]).scores, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["longest", "shortest"])
def test_preprocessing_matches_open_clip_transforms(mode: str, rewards: dict) -> None:
    """Our pure-torch resize policies against open_clip's own PIL transforms (HPS: 'longest')."""
    from open_clip.transform import image_transform

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 40), indexing="ij")
    smooth = torch.stack([xx, yy, (xx + yy) / 2])  # PIL and torch bicubic agree closely on smooth images
    img = Image.fromarray((smooth.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    theirs = image_transform(32, is_train=False, resize_mode=mode)(img)
    reward = rewards["hpsv2" if mode == "longest" else "clipscore"]
    ours = reward.preprocess(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255)[0]
    assert theirs.shape == ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=0.03, rtol=0)


def test_open_clip_tokenizer_path_matches_hf_tokenizer() -> None:
    """With open_clip's own tokenizer (the published HPS path) the ids are those the HF tokenizer path
    produces (padding replaced by 0), and long prompts warn the same way."""
    import open_clip

    model, _ = tiny_open_clip_model(0)
    ours = OpenClipBackbone(model, open_clip.get_tokenizer("ViT-H-14"))
    hf = OpenClipBackbone(model, clip_tokenizer())
    texts = ["a photo of a cat", "A Red  Square, on a blue background!", "an astronaut riding a horse " * 20]
    with pytest.warns(UserWarning, match="token limit"):
        warn_if_truncated(ours.tokenizer, texts, ours.context_length)
    assert torch.equal(ours.tokenize(texts)["text"], hf.tokenize(texts)["text"])


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_goal_clip_formula(alpha: float) -> None:
    reward = tiny_reward("goal_clip", alpha=alpha, baseline="a picture")
    x = _images()
    model, tok = tiny_clip_model(0)
    img, txt = _hf_embeddings(model, tok, _crop_by_hand(x), [*PROMPTS, "a picture"])
    g, b = txt[:-1], txt[-1:]
    expected = []
    for i in range(len(x)):  # VLM-RM's own form: 1 - ||(x - g) M||^2 / 2, M = alpha P + (1 - alpha) I
        d = (g[i] - b[0])[None]
        proj = d.T @ d / d.norm() ** 2
        m = alpha * proj + (1 - alpha) * torch.eye(d.shape[1])
        expected.append(1 - ((img[i] - g[i]) @ m).norm() ** 2 / 2)
    out = reward(x, PROMPTS)
    torch.testing.assert_close(out.scores, torch.stack(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.components["cosine"], (img * g).sum(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.components["baseline_cosine"], img @ b[0], atol=1e-6, rtol=0)
    if alpha == 0.0:  # no projection: the plain cosine
        torch.testing.assert_close(out.scores, out.components["cosine"], atol=1e-6, rtol=0)
    assert reward.provenance()["baseline"] == "a picture" and reward.provenance()["alpha"] == alpha
    assert ((out.scores >= -1) & (out.scores <= 1)).all()


def test_goal_clip_options_and_degenerate_prompt() -> None:
    with pytest.raises(ValueError, match="alpha"):
        tiny_reward("goal_clip", alpha=1.5)
    with pytest.raises(ValueError, match="baseline"):
        tiny_reward("goal_clip", baseline=" ")
    out = tiny_reward("goal_clip")(_images(2), ["a photo", "a photo of a cat"])  # no goal-baseline direction
    assert out.valid.tolist() == [False, True] and math.isnan(out.scores[0]) and "non-finite" in out.reasons[0]


def test_aesthetic_formula_and_published_state_dict(tmp_path) -> None:
    head = tiny_aesthetic_head(seed=5)
    state = head.state_dict()
    published = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert set(state) == published  # sac+logos+ava1-l14-linearMSE.pth's keys
    assert [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [(1024, 32), (128, 1024), (64, 128), (16, 64), (1, 16)]
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    model, tok = tiny_clip_model(0)
    reward = load_aesthetic(model=model, head_path=path)
    assert str(path) in reward.weights_id
    x = _images()
    img, _ = _hf_embeddings(model, tok, _crop_by_hand(x), PROMPTS[:1])
    y = img
    for i in (0, 2, 4, 6, 7):  # linear layers, no activations (dropout is off at inference)
        y = F.linear(y, state[f"layers.{i}.weight"], state[f"layers.{i}.bias"])
    out = reward(x)
    torch.testing.assert_close(out.scores, y[:, 0], atol=1e-5, rtol=0)
    assert AestheticMLP().layers[0].in_features == 768  # the published ViT-L/14 size by default
    # a Lightning-style checkpoint loads too; a head for another embedding size is refused clearly
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth")
    torch.testing.assert_close(load_aesthetic(model=model, head_path=tmp_path / "ckpt.pth")(x).scores, out.scores)
    torch.save(AestheticMLP(768).state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="32-d"):
        load_aesthetic(model=model, head_path=tmp_path / "wrong.pth")
    # train() on the enclosing module keeps dropout off: scores stay deterministic
    reward.train()
    assert not reward.head.training and not reward.backbone.training
    torch.testing.assert_close(reward(x).scores, out.scores)


# ----------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_pixels(name: str, rewards: dict) -> None:
    x = _images(3).requires_grad_(True)
    out = rewards[name](x, None if name == "aesthetic" else PROMPTS[:3])
    assert out.scores.requires_grad
    out.scores.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all(), f"{name}: some item got no gradient"


@pytest.mark.parametrize("name", NAMES)
def test_batch_size_invariance(name: str) -> None:
    x = _images()
    one = _scores(tiny_reward(name, batch_size=1), x)
    eight = _scores(tiny_reward(name, batch_size=8), x)
    three = _scores(tiny_reward(name, batch_size=3), x)
    torch.testing.assert_close(one, eight, atol=1e-5, rtol=0)
    torch.testing.assert_close(three, eight, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", PROMPTED)
def test_each_item_scored_against_its_own_prompt(name: str, rewards: dict) -> None:
    reward = rewards[name]
    x = _images()
    together = _scores(reward, x)
    alone = torch.cat([_scores(reward, x[i : i + 1], [PROMPTS[i]]) for i in range(len(x))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    shifted = _scores(reward, x, PROMPTS[1:] + PROMPTS[:1])
    assert not torch.allclose(shifted, together)
    # one string is broadcast to every item
    torch.testing.assert_close(_scores(reward, x, PROMPTS[0]), _scores(reward, x, [PROMPTS[0]] * 8), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_items_reported(name: str, rewards: dict, tmp_path) -> None:
    reward = rewards[name]
    x = _images(4)
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    items = [bad[0], bad[1], str(corrupt), bad[3]]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], ""]
    out = reward(items, prompts)
    reasons = out.reasons
    assert "non-finite" in reasons[1] and "unreadable" in reasons[2]
    if name == "aesthetic":  # needs no prompt: the empty one does not matter
        assert out.valid.tolist() == [True, False, False, True]
    else:
        assert out.valid.tolist() == [True, False, False, False] and reasons[3] == "empty prompt"
    assert torch.isnan(out.scores[~out.valid]).all() and torch.isfinite(out.scores[out.valid]).all()
    alone = _scores(reward, x[:1], PROMPTS[:1])
    torch.testing.assert_close(out.scores[:1], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="B,3,H,W"):
        reward(torch.rand(2, 4, 32, 32), PROMPTS[:2])
    with pytest.raises(ValueError, match="B,3,H,W"):
        reward(torch.rand(2, 32, 32, 3), PROMPTS[:2])  # channels-last tensors are a layout mistake
    if name != "aesthetic":
        with pytest.raises(ValueError, match="prompts"):
            reward(x)


@pytest.mark.parametrize("name", NAMES)
def test_pil_lists_and_files_score_like_tensors(name: str, rewards: dict, tmp_path) -> None:
    reward = rewards[name]
    x = _images(3)
    arrays = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    quantised = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
    pils = [Image.fromarray(a) for a in arrays]  # what pipe(...).images returns
    paths = []
    for i, im in enumerate(pils):
        paths.append(tmp_path / f"img_{i}.png")
        im.save(paths[-1])
    ref = _scores(reward, quantised, PROMPTS)
    torch.testing.assert_close(_scores(reward, pils, PROMPTS), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(_scores(reward, [str(p) for p in paths], PROMPTS), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(_scores(reward, list(arrays), PROMPTS), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(_scores(reward, torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous(), PROMPTS), ref, atol=1e-5, rtol=0)
    # and within uint8 quantisation of the float tensor
    scale = 100.0 if name == "clipscore" else 15.0 if name == "pickscore" else 1.0
    torch.testing.assert_close(ref, _scores(reward, x, PROMPTS), atol=0.02 * scale, rtol=0)


@pytest.mark.parametrize("name", ["clipscore", "hpsv2", "aesthetic"])
def test_mixed_image_sizes_in_one_batch(name: str, rewards: dict) -> None:
    reward = rewards[name]
    items = [_images(1, 40, 48)[0], _images(1, 32, 32, seed=1)[0], _images(1, 64, 20, seed=2)[0]]
    together = _scores(reward, items, PROMPTS[:3])
    alone = torch.cat([_scores(reward, t[None], [p]) for t, p in zip(items, PROMPTS)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    # gradients reach every item of a mixed batch too
    leaves = [t.clone().requires_grad_(True) for t in items]
    reward(leaves, None if name == "aesthetic" else PROMPTS[:3]).scores.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)


@pytest.mark.parametrize("name", PROMPTED)
def test_long_prompts_warn(name: str, rewards: dict) -> None:
    reward = rewards[name]
    long = "a photo of a cat sitting on a red chair next to a window " * 8
    with pytest.warns(UserWarning, match="77-token limit"):
        out = reward(_images(2), [PROMPTS[0], long])
    assert out.all_valid
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reward(_images(2), PROMPTS[:2])  # short prompts: no warning


@pytest.mark.parametrize("name", ["clipscore", "hpsv2", "aesthetic"])
def test_dtype_option(name: str, rewards: dict) -> None:
    half = tiny_reward(name, dtype="bfloat16")
    assert next(half.backbone.parameters()).dtype == torch.bfloat16
    if name == "aesthetic":
        assert next(half.head.parameters()).dtype == torch.float32  # head in float32
    x = _images(4)
    out = half(x, None if name == "aesthetic" else PROMPTS[:4])
    assert out.scores.dtype == torch.float32 and out.all_valid
    scale = 100.0 if name == "clipscore" else 1.0
    torch.testing.assert_close(out.scores, _scores(rewards[name], x), atol=0.05 * scale, rtol=0)
    with pytest.raises(ValueError, match="dtype"):
        tiny_reward(name, dtype="float8")


# ----------------------------------------------------------------------------- published weights, offline
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["env", "option"])
def test_published_ids_fail_fast_offline(name: str, how: str, tmp_path, monkeypatch) -> None:
    """Loading a published id with nothing cached fails at once with a clear OSError, touching no network."""
    attempts = []

    def no_network(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    kwargs = {"cache_dir": str(tmp_path)}
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("MMALIGN_OFFLINE", raising=False)
        kwargs["offline"] = True
    start = time.perf_counter()
    with pytest.raises(OSError, match="offline") as err:
        load_reward(name, **kwargs)
    assert time.perf_counter() - start < 10
    assert not attempts, f"{name}: tried the network: {attempts}"
    published = {"clipscore": "openai/clip-vit-large-patch14", "pickscore": "yuvalkirstain/PickScore_v1",
                 "hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt",
                 "aesthetic": "aesthetic-model.pth", "goal_clip": "openai/clip-vit-large-patch14"}[name]
    assert published in str(err.value)


def test_local_checkpoints_load_through_the_published_paths(tmp_path, rewards: dict) -> None:
    """The hub-loading code paths, fed local files: a saved CLIPModel directory (with its tokenizer and
    preprocessor config), and an HPS-style ``{"state_dict": ...}`` checkpoint for an open_clip config."""
    import json

    import open_clip

    model, tok = tiny_clip_model(0)
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    loaded = load_reward("clipscore", model_id=str(tmp_path / "clip"), offline=True)
    assert loaded.weights_id == str(tmp_path / "clip")
    assert loaded.preprocess.mean == (0.5,) * 3 and loaded.preprocess.std == (0.25,) * 3 and loaded.preprocess.size == 32
    x = _images(4)
    pixels = _crop_by_hand(x) * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)  # undo CLIP's
    img, txt = _hf_embeddings(model, tok, (pixels - 0.5) / 0.25, PROMPTS[:4])
    torch.testing.assert_close(loaded(x, PROMPTS[:4]).scores, (100 * (img * txt).sum(-1)).clamp(min=0), atol=1e-4, rtol=0)
    # PickScore-style: weights from one place, tokenizer and preprocessing from processor_id
    model.save_pretrained(tmp_path / "weights_only")
    pick = load_reward("pickscore", model_id=str(tmp_path / "weights_only"), processor_id=str(tmp_path / "clip"), offline=True)
    assert pick.preprocess.mean == (0.5,) * 3
    assert next(pick.backbone.parameters()).dtype == torch.float32

    hps_model, hps_tok = tiny_open_clip_model(0)
    cfg_dir = tmp_path / "open_clip_configs"
    cfg_dir.mkdir()
    (cfg_dir / "mmalign-tiny-hps.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": len(hps_tok), "width": 32, "heads": 4, "layers": 2},
    }))
    open_clip.add_model_config(cfg_dir)
    torch.save({"state_dict": {f"module.{k}": v for k, v in hps_model.state_dict().items()}}, tmp_path / "HPS_v2_compressed.pt")
    hps = load_reward("hpsv2", checkpoint=tmp_path / "HPS_v2_compressed.pt", arch="mmalign-tiny-hps", tokenizer=hps_tok)
    assert hps.weights_id == str(tmp_path / "HPS_v2_compressed.pt") and hps.preprocess.policy == "longest_side_pad"
    torch.testing.assert_close(hps(x, PROMPTS[:4]).scores, _scores(rewards["hpsv2"], x), atol=1e-5, rtol=0)
