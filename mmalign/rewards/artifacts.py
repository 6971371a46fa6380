"""Artifact assessor: a taxonomy of generated-image flaws, each asked as a yes/no question to a VLM.

The taxonomy (:data:`ARTIFACT_TAXONOMY`) maps a label ``group/part`` to a question asking whether that
flaw is present (so "Yes" means flawed), after the artifact classes of MagicMirror (arXiv 2509.10260):
anatomy (hands, faces, limbs, bodies, animals), structure and geometry, texture and detail, text
rendering, physics and lighting. Each category's P(flaw) = P("Yes") is read from one teacher-forced
forward pass of the shared :class:`~mmalign.rewards.vlm.VLMCore`; every image goes through the vision
tower once and all (image, category) questions through the language model in batched passes.

Score (``aggregate``): ``"max"`` (default) 1 - max_c P(flaw_c): an image is as good as its worst flaw,
the assessor's reading (one malformed hand spoils an image however clean the rest); ``"mean"``
1 - sum_c w_c P(flaw_c) / sum_c w_c (``weights`` per label, default 1), a smoother training signal
that spreads gradient over all categories. Components: P(flaw) per category label;
:func:`worst_categories` lists the top-k flaw labels per item.

Choose categories with ``categories=`` (labels, or group names such as ``"anatomy"``), add or override
with ``extra_categories={label: question}``, or replace the whole table with ``taxonomy=``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping, Sequence

import torch

from .base import RewardOutput, ScoreBatch
from .vlm import VLMQuery, VLMReward, _YesNoMixin, Normalize

#: label ("group/part") -> yes/no question asking whether the flaw is present
ARTIFACT_TAXONOMY: dict[str, str] = {
    "anatomy/hands": "Does this image contain malformed hands, such as extra, missing, fused or twisted fingers?",
    "anatomy/faces": "Does this image contain a distorted face, such as asymmetric, melted or misplaced eyes, nose or mouth?",
    "anatomy/limbs": "Does this image contain extra, missing, duplicated or impossibly bent arms or legs?",
    "anatomy/bodies": "Does this image contain a body with wrong proportions, merged bodies or an impossible pose?",
    "anatomy/animals": "Does this image contain an animal with wrong anatomy, such as extra legs, heads or tails?",
    "structure/geometry": "Does this image contain objects with broken structure, impossible geometry or inconsistent perspective?",
    "structure/fusion": "Does this image contain objects that are fused into each other or cut off unnaturally?",
    "texture/detail": "Does this image contain smeared, blurry, noisy or repetitive unnatural textures?",
    "text/rendering": "Does this image contain garbled, misspelled or unreadable text?",
    "physics/lighting": "Does this image contain physically inconsistent lighting, shadows or reflections?",
}
ARTIFACT_TEMPLATE = "{question} Please answer yes or no."


def select_taxonomy(taxonomy: Mapping[str, str] | None = None, categories: Sequence[str] | None = None,
                    extra_categories: Mapping[str, str] | None = None) -> dict[str, str]:
    """The label -> question table a reward asks: ``taxonomy`` (default :data:`ARTIFACT_TAXONOMY`),
    restricted to ``categories`` (labels or group prefixes, in the given order), plus ``extra_categories``."""
    table = dict(ARTIFACT_TAXONOMY if taxonomy is None else taxonomy)
    if categories is not None:
        chosen: dict[str, str] = {}
        for c in categories:
            hits = [k for k in table if k == c or k.startswith(c.rstrip("/") + "/")]
            if not hits and c not in (extra_categories or {}):
                raise ValueError(f"unknown artifact category {c!r} (known: {', '.join(table)})")
            chosen.update({k: table[k] for k in hits})
        table = chosen
    for label, question in (extra_categories or {}).items():
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"artifact category {label!r} needs a non-empty question")
        table[label] = question
    if not table:
        raise ValueError("no artifact categories selected")
    return table


class ArtifactReward(_YesNoMixin, VLMReward):
    """1 - aggregated P(flaw) over an artifact taxonomy (see the module docstring). Options: those of
    :class:`~mmalign.rewards.vlm.VLMReward`, plus ``taxonomy``, ``categories``, ``extra_categories``,
    ``aggregate`` ("max" | "mean"), ``weights`` (label -> weight, for "mean"), ``template`` (formats
    ``{question}``), ``yes_words`` / ``no_words`` / ``normalize`` as for vqascore."""

    name = "artifacts"
    needs: ClassVar[frozenset[str]] = frozenset()
    default_template = ARTIFACT_TEMPLATE

    def __init__(self, *, taxonomy: Mapping[str, str] | None = None, categories: Sequence[str] | None = None,
                 extra_categories: Mapping[str, str] | None = None, aggregate: Literal["max", "mean"] = "max",
                 weights: Mapping[str, float] | None = None, yes_words: Sequence[str] = ("Yes",), no_words: Sequence[str] = ("No",),
                 normalize: Normalize = "vocab", answer_prefix: str = "", **options: Any) -> None:
        if aggregate not in ("max", "mean"):
            raise ValueError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
        super().__init__(**options)
        self.taxonomy = select_taxonomy(taxonomy, categories, extra_categories)
        self.labels = list(self.taxonomy)
        weights = dict(weights or {})
        unknown = set(weights) - set(self.labels)
        if unknown:
            raise ValueError(f"weights for unknown categories {sorted(unknown)}")
        w = torch.tensor([float(weights.get(k, 1.0)) for k in self.labels], dtype=torch.float32)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("category weights must be >= 0 with a positive sum")
        self.register_buffer("category_weights", w, persistent=False)
        self.aggregate = aggregate
        self._init_answer(yes_words, no_words, normalize, answer_prefix)
        self.preprocessing.update({"taxonomy": dict(self.taxonomy), "aggregate": aggregate, "weights": {k: float(v) for k, v in zip(self.labels, w)}})

    def provenance(self) -> dict[str, Any]:
        return {**super().provenance(), "categories": list(self.labels)}

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        b, c = samples.shape[0], len(self.labels)
        questions = [self.template.format(question=self.taxonomy[k]) for k in self.labels]
        queries = [VLMQuery((i,), q, self.answer_prefix) for i in range(b) for q in questions]
        with self._grad_context(samples):
            p_flaw, _ = self._read(self.core.answer_logits(samples, queries))
        flaws = p_flaw.reshape(b, c)
        if self.aggregate == "max":
            scores = 1 - flaws.max(dim=1).values
        else:
            w = self.category_weights.to(flaws.device)
            scores = 1 - (flaws * w).sum(1) / w.sum()
        components = {label: flaws[:, j] for j, label in enumerate(self.labels)}
        components["p_flaw"] = flaws  # B, C in the order of provenance["categories"]
        return ScoreBatch(scores, components)

    def worst_categories(self, output: RewardOutput, k: int = 3, threshold: float | None = None, with_probs: bool = False):
        return worst_categories(output, k, threshold=threshold, with_probs=with_probs)


def worst_categories(output: RewardOutput, k: int = 3, *, threshold: float | None = None, with_probs: bool = False) -> list[list[Any]]:
    """Top-``k`` flaw labels per item of an ``artifacts`` output, most probable first (MagicMirror-style
    labels such as ``"anatomy/hands"``). ``threshold``: keep only flaws with P >= threshold.
    ``with_probs``: (label, P) pairs. Invalid items get an empty list."""
    labels = output.provenance.get("categories")
    if not labels or "p_flaw" not in output.components:
        raise ValueError("worst_categories needs the output of an artifacts reward")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    flaws = output.components["p_flaw"].detach().float().cpu()
    result: list[list[Any]] = []
    for i in range(len(output)):
        if not bool(output.valid[i]):
            result.append([])
            continue
        order = torch.argsort(flaws[i], descending=True, stable=True).tolist()
        picked = [(labels[j], float(flaws[i, j])) for j in order if threshold is None or float(flaws[i, j]) >= threshold][:k]
        result.append(picked if with_probs else [label for label, _ in picked])
    return result


def load_artifacts(**options: Any) -> ArtifactReward:
    """The artifact assessor (see :class:`ArtifactReward`)."""
    return ArtifactReward(**options)


__all__ = ["ARTIFACT_TAXONOMY", "ARTIFACT_TEMPLATE", "ArtifactReward", "load_artifacts", "select_taxonomy", "worst_categories"]
