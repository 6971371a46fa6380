"""Judging the judges: pairwise accuracy of a reward model on a human preference set.

Two on-disk formats (:func:`load_preferences` takes either):

**JSONL** — one pair per line (blank lines ignored), media paths relative to the JSONL file::

    {"prompt": "a red cube", "chosen": "img/001_a.png", "rejected": "img/001_b.png", "category": "color"}
    {"prompt": "two dogs", "chosen": "img/002_a.png", "rejected": "img/002_b.png", "tie": true}

``prompt``, ``chosen``, ``rejected`` are required strings; ``category`` (string) and ``tie`` (bool: the
annotators found neither better) are optional; other keys are kept as the pair's ``meta``.

**Folder** — one directory per pair, anywhere below the root, holding ``prompt.txt``, exactly one
``chosen.<ext>`` and one ``rejected.<ext>`` file, and optionally ``meta.json`` (``{"category": ...,
"tie": ...}``). Without a category in ``meta.json``, the category is the path of the pair directory's
parent relative to the root (``prefs/hands/0001/`` -> ``hands``; pairs directly under the root have none)::

    prefs/hands/0001/{prompt.txt, chosen.png, rejected.png}
    prefs/text/0002/{prompt.txt, chosen.png, rejected.png, meta.json}

:func:`evaluate_reward` scores every chosen and rejected sample and counts, per pair (MJ-Bench style,
arXiv 2407.04842): *correct* (chosen scored better, in the reward's direction), *wrong*, *predicted tie*
(|difference| <= ``tol``), *invalid* (either sample not scored: never a win) and *human ties* (pairs
labelled ``tie``: kept out of accuracy; ``human_tie_agree`` counts those the reward also ties).
``accuracy`` = correct / (correct + wrong) (ties and invalid excluded: MJ-Bench "w/o ties");
``accuracy_strict`` = correct / (pairs that are not human ties) (predicted ties and invalid count as
misses).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .base import Reward


class PreferenceDataError(ValueError):
    """A preference set cannot be read; the message names the file and line."""


@dataclass
class PreferencePair:
    prompt: str
    chosen: Path
    rejected: Path
    category: str | None = None
    tie: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "file.jsonl:LINE" or the pair directory


@dataclass
class PreferenceSet:
    pairs: list[PreferencePair]
    root: Path
    name: str = ""

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)

    def categories(self) -> list[str]:
        return sorted({p.category for p in self.pairs if p.category is not None})


def _resolve_media(base: Path, value: str, where: str, key: str) -> Path:
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise PreferenceDataError(f"{where}: {key} file {str(path)!r} does not exist")
    return path


def read_jsonl_objects(path: Path, required: Sequence[str], error: type[Exception] = ValueError) -> Iterator[tuple[str, dict]]:
    """``("file:LINE", record)`` for every non-empty line of a JSONL file of objects; ``error`` naming the
    file and line for text that is not UTF-8, a line that is not JSON, not an object, or lacks a key of
    ``required``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise error(f"{path}: not a UTF-8 text file ({err})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(rec, dict):
            raise error(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in required if k not in rec]
        if missing:
            raise error(f"{where}: missing key(s) {', '.join(missing)} (need {', '.join(required)})")
        yield where, rec


def _read_jsonl(path: Path) -> PreferenceSet:
    pairs = []
    for where, rec in read_jsonl_objects(path, ("prompt", "chosen", "rejected"), PreferenceDataError):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(rec[key], str):
                raise PreferenceDataError(f"{where}: {key} must be a string, got {type(rec[key]).__name__}")
        category = rec.get("category")
        if category is not None and not isinstance(category, str):
            raise PreferenceDataError(f"{where}: category must be a string, got {type(category).__name__}")
        tie = rec.get("tie", False)
        if not isinstance(tie, bool):
            raise PreferenceDataError(f"{where}: tie must be true or false, got {tie!r}")
        meta = {k: v for k, v in rec.items() if k not in ("prompt", "chosen", "rejected", "category", "tie")}
        pairs.append(PreferencePair(
            prompt=rec["prompt"], chosen=_resolve_media(path.parent, rec["chosen"], where, "chosen"),
            rejected=_resolve_media(path.parent, rec["rejected"], where, "rejected"),
            category=category, tie=tie, meta=meta, source=where,
        ))
    return PreferenceSet(pairs, path.parent, path.stem)


def _one(files: list[Path], stem: str, where: Path) -> Path:
    found = [f for f in files if f.stem == stem]
    if len(found) != 1:
        raise PreferenceDataError(f"{where}: expected exactly one {stem}.<ext> file, found {len(found)}")
    return found[0]


def _read_folder(root: Path) -> PreferenceSet:
    pairs = []
    for prompt_file in sorted(root.rglob("prompt.txt")):
        d = prompt_file.parent
        files = [f for f in d.iterdir() if f.is_file()]
        chosen, rejected = _one(files, "chosen", d), _one(files, "rejected", d)
        prompt = prompt_file.read_text(encoding="utf-8").strip()
        meta: dict[str, Any] = {}
        if (d / "meta.json").is_file():
            try:
                meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise PreferenceDataError(f"{d / 'meta.json'}: not valid JSON ({err.msg} at line {err.lineno})") from None
            if not isinstance(meta, dict):
                raise PreferenceDataError(f"{d / 'meta.json'}: expected a JSON object")
        rel = d.parent.relative_to(root)
        category = meta.pop("category", None if str(rel) == "." else rel.as_posix())
        tie = meta.pop("tie", False)
        if not isinstance(tie, bool):
            raise PreferenceDataError(f"{d / 'meta.json'}: tie must be true or false, got {tie!r}")
        pairs.append(PreferencePair(prompt, chosen, rejected, category, tie, meta, str(d)))
    if not pairs:
        raise PreferenceDataError(f"{root}: no preference pairs (directories with prompt.txt, chosen.*, rejected.*) found")
    return PreferenceSet(pairs, root, root.name)


def load_preferences(path: str | os.PathLike) -> PreferenceSet:
    """A preference set from a JSONL file or a folder (module docstring). Raises
    :class:`FileNotFoundError` for a missing path and :class:`PreferenceDataError` (naming the file and
    line) for malformed content."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"preference data {str(p)!r} does not exist")
    data = _read_folder(p) if p.is_dir() else _read_jsonl(p)
    if not data.pairs:
        raise PreferenceDataError(f"{p}: holds no preference pairs")
    return data


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Counts:
    pairs: int = 0
    correct: int = 0
    wrong: int = 0
    pred_ties: int = 0
    invalid: int = 0
    human_ties: int = 0
    human_tie_agree: int = 0

    @property
    def decided(self) -> int:
        return self.correct + self.wrong

    @property
    def accuracy(self) -> float:
        """correct / (correct + wrong): ties and invalid pairs excluded (NaN when none is decided)."""
        return self.correct / self.decided if self.decided else math.nan

    @property
    def accuracy_strict(self) -> float:
        """correct / non-tie pairs: predicted ties and invalid pairs count as misses."""
        n = self.pairs - self.human_ties
        return self.correct / n if n else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy, "accuracy_strict": self.accuracy_strict}


@dataclass
class JudgeReport:
    reward: str
    overall: Counts
    per_category: dict[str, Counts]
    pairs: list[dict[str, Any]]
    tol: float

    def to_dict(self) -> dict[str, Any]:
        return {"reward": self.reward, "tol": self.tol, "overall": self.overall.to_dict(),
                "per_category": {k: v.to_dict() for k, v in self.per_category.items()}, "pairs": self.pairs}

    def table(self) -> str:
        """A fixed-width accuracy table (overall first, then per category)."""
        head = f"{'category':20s} {'pairs':>5s} {'acc':>6s} {'strict':>6s} {'correct':>7s} {'wrong':>5s} {'ties':>4s} {'invalid':>7s} {'human ties':>10s}"
        rows = [head, "-" * len(head)]

        def fmt(name: str, c: Counts) -> str:
            acc = "-" if math.isnan(c.accuracy) else f"{c.accuracy:.3f}"
            strict = "-" if math.isnan(c.accuracy_strict) else f"{c.accuracy_strict:.3f}"
            ht = f"{c.human_ties} ({c.human_tie_agree} agree)" if c.human_ties else "0"
            return (f"{name[:20]:20s} {c.pairs:5d} {acc:>6s} {strict:>6s} {c.correct:7d} {c.wrong:5d} "
                    f"{c.pred_ties:4d} {c.invalid:7d} {ht:>10s}")

        rows.append(fmt("overall", self.overall))
        for name, c in self.per_category.items():
            rows.append(fmt(name, c))
        return "\n".join(rows)


def _size_key(path: Path) -> Any:
    """Items with equal keys can share a batch (same media size)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return ("image", im.size, getattr(im, "n_frames", 1))
    except Exception:  # noqa: BLE001 - not an image (audio) or unreadable: the reward reports it
        return ("file", str(path))


def score_files(reward: Reward, files: Sequence[str | os.PathLike], prompts: Sequence[str] | None, *, batch_size: int = 16,
                metadata: Sequence[dict[str, Any]] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Score media files, batching files of one size together; one row per file, in order, as
    :meth:`RewardOutput.rows` gives them (score, valid, reason, scalar components)."""
    files = [Path(f) for f in files]
    n = len(files)
    keys = {i: repr(_size_key(files[i])) for i in range(n)}
    batches: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: keys[i]):
        if batches and keys[batches[-1][0]] == keys[i] and len(batches[-1]) < batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for idx in batches:
        kw = dict(kwargs)
        if "metadata" in reward.needs:
            kw["metadata"] = [dict(metadata[i]) if metadata else {} for i in idx]
        with torch.no_grad():
            out = reward([files[i] for i in idx], None if prompts is None else [prompts[i] for i in idx], **kw)
        for j, row in zip(idx, out.rows()):
            if row["valid"] and not math.isfinite(row["score"]):
                row.update(valid=False, reason="non-finite score")
            rows[j] = row
    return rows


def evaluate_reward(reward: Reward | Any, dataset: PreferenceSet | str | os.PathLike | Iterable[PreferencePair], *,
                    tol: float = 0.0, batch_size: int = 16) -> JudgeReport:
    """Pairwise accuracy of ``reward`` on a preference set (a :class:`PreferenceSet`, a path, or pairs).

    Each distinct (file, prompt) is scored once. See the module docstring for the counts.
    """
    from .combine import resolve_reward

    reward = resolve_reward(reward)
    if "reference" in reward.needs:
        raise ValueError(f"{reward.name} compares against reference samples; pairwise evaluation scores each sample alone")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_preferences(dataset)
    pairs = list(dataset)
    if not pairs:
        raise ValueError("the preference set is empty")
    keys: dict[tuple[str, str], int] = {}
    files: list[Path] = []
    prompts: list[str] = []
    metas: list[dict[str, Any]] = []
    for p in pairs:
        for f in (p.chosen, p.rejected):
            k = (str(f), p.prompt)
            if k not in keys:
                keys[k] = len(files)
                files.append(Path(f))
                prompts.append(p.prompt)
                metas.append({"category": p.category, **p.meta})
    rows = score_files(reward, files, prompts, batch_size=batch_size, metadata=metas)
    scores = [r["score"] if r["valid"] else math.nan for r in rows]
    reasons = [None if r["valid"] else (r["reason"] or "not scored") for r in rows]
    sign = 1.0 if reward.higher_is_better else -1.0
    overall = Counts()
    per_cat: dict[str, Counts] = {}
    records = []
    for p in pairs:
        i, j = keys[(str(p.chosen), p.prompt)], keys[(str(p.rejected), p.prompt)]
        sc, sr = scores[i], scores[j]
        if reasons[i] is not None or reasons[j] is not None:
            outcome = "invalid"
        else:
            diff = sign * (sc - sr)
            outcome = "tie" if abs(diff) <= tol else ("correct" if diff > 0 else "wrong")
        targets = [overall] + ([per_cat.setdefault(p.category, Counts())] if p.category is not None else [])
        for c in targets:
            c.pairs += 1
            if p.tie:
                c.human_ties += 1
                c.human_tie_agree += outcome == "tie"
                if outcome == "invalid":
                    c.invalid += 1
                continue
            if outcome == "correct":
                c.correct += 1
            elif outcome == "wrong":
                c.wrong += 1
            elif outcome == "tie":
                c.pred_ties += 1
            else:
                c.invalid += 1
        records.append({"source": p.source, "prompt": p.prompt, "category": p.category, "human_tie": p.tie,
                        "chosen": str(p.chosen), "rejected": str(p.rejected), "score_chosen": sc, "score_rejected": sr,
                        "outcome": outcome, "reason": reasons[i] or reasons[j]})
    return JudgeReport(reward.name, overall, dict(sorted(per_cat.items())), records, tol)


__all__ = ["Counts", "JudgeReport", "PreferenceDataError", "PreferencePair", "PreferenceSet", "evaluate_reward",
           "load_preferences", "score_files"]
