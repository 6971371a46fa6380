"""rewards: score media with several rewards at once.

Upload files (or give paths / glob patterns on the server, e.g. ``runs/sample/*.png``) and a prompt (one
for all, or one per line per file); every selected reward scores every file. The table shows each
score, its components and its rank among the files (rank 1 = best in the reward's direction). The
preference-pair tab asks which of two samples each reward prefers, and by how much.
"""
from __future__ import annotations

import base64
import glob
import math
import os
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Sequence

from .common import (
    APP_CSS,
    AppSettings,
    Limits,
    ProgressFn,
    Resources,
    Score,
    format_number,
    noop_progress,
    score_samples,
    scores_html,
    selected_rewards,
)

MODALITIES = ["image", "video", "audio"]
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp",
        ".gif": "image/gif", ".wav": "audio/wav", ".mp4": "video/mp4"}


def _video_suffixes() -> set[str]:
    """GIF always; MP4 where mmalign can read it (``mmalign.media.read_video`` with PyAV)."""
    import importlib.util

    from mmalign import media

    readable = hasattr(media, "read_video") and importlib.util.find_spec("av") is not None
    return {".gif", ".mp4"} if readable else {".gif"}


SUFFIXES = {"image": {".png", ".jpg", ".jpeg", ".webp", ".bmp"}, "video": _video_suffixes(), "audio": {".wav"}}
MAX_FILE_BYTES = 50 * 1024 * 1024


@dataclass
class ScoreTable:
    """Scores of N files by R rewards: ``scores[i][j]`` and ``ranks[i][j]`` (None where not scored)."""

    files: list[str]
    prompts: list[str]
    modality: str
    rewards: list[str]
    scores: list[list[Score]]
    ranks: list[list[int | None]]


def _upload_path(item: Any) -> str:
    """A gradio upload (a path string, or an object / dict with a ``path`` / ``name``) as a path."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, dict):
        return str(item.get("path") or item.get("name"))
    return str(getattr(item, "path", None) or getattr(item, "name"))


def collect_files(uploaded: Sequence[Any] | None, paths_text: str | None, modality: str, limits: Limits) -> list[str]:
    """Uploaded files plus server paths / glob patterns (comma or newline separated), in order, checked
    to exist and to have a suffix of ``modality`` (PNG/JPEG/... images, GIF videos, WAV audio)."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r} (choose one of {', '.join(MODALITIES)})")
    files = [_upload_path(u) for u in (uploaded or [])]
    for pattern in (paths_text or "").replace(",", "\n").splitlines():
        pattern = pattern.strip()
        if not pattern:
            continue
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise ValueError(f"no file matches {pattern!r} (working directory: {os.getcwd()})")
        files += matches
    if not files:
        raise ValueError("no media: upload files or give paths / glob patterns")
    if len(files) > limits.max_files:
        raise ValueError(f"{len(files)} files given; at most {limits.max_files} per scoring")
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise ValueError(f"file {f!r} does not exist")
        if p.suffix.lower() not in SUFFIXES[modality]:
            allowed = ", ".join(sorted(SUFFIXES[modality]))
            raise ValueError(f"{p.name}: not a {modality} file ({modality} files are {allowed}); pick the right media kind")
        if p.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{p.name} is larger than {MAX_FILE_BYTES // 2**20} MB")
    return files


def prompts_for(prompt_text: str | None, count: int) -> list[str]:
    """One prompt for every file, or one non-empty line per file."""
    lines = [ln.strip() for ln in (prompt_text or "").splitlines() if ln.strip()]
    if not lines:
        raise ValueError("enter a prompt (one for all files, or one line per file)")
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"{len(lines)} prompt lines for {count} files: give one prompt, or one line per file")
    return lines


def rank(values: Sequence[float], higher_is_better: bool) -> list[int | None]:
    """Competition ranks (1 = best; ties share a rank) of the finite values; None for the others."""
    finite = [v for v in values if math.isfinite(v)]
    out: list[int | None] = []
    for v in values:
        if not math.isfinite(v):
            out.append(None)
            continue
        better = sum(1 for w in finite if (w > v if higher_is_better else w < v))
        out.append(better + 1)
    return out


def score_files(resources: Resources, files: Sequence[str], prompts: Sequence[str], modality: str, rewards: Sequence[str],
                sample_rate: int | None = None, progress: ProgressFn = noop_progress) -> ScoreTable:
    """Score every file with every reward and rank the files per reward."""
    if not rewards:
        raise ValueError("select at least one reward")
    specs = list(rewards)
    per_file: list[list[Score]] = [[] for _ in files]
    for j, spec in enumerate(specs):
        progress(j / len(specs), desc=f"scoring with {spec}")
        extra = {"sample_rate": sample_rate} if modality == "audio" and sample_rate else {}
        rows = score_samples(resources, [spec], list(files), list(prompts), modality, extra)
        for i, row in enumerate(rows):
            per_file[i].extend(row)
    ranks_by_reward = [rank([per_file[i][j].score if per_file[i][j].valid else math.nan for i in range(len(files))],
                            per_file[0][j].higher_is_better) for j in range(len(specs))]
    ranks = [[ranks_by_reward[j][i] for j in range(len(specs))] for i in range(len(files))]
    progress(1.0, desc="done")
    return ScoreTable(list(files), list(prompts), modality, specs, per_file, ranks)


def file_html(path: str, css_class: str = "mm-media") -> str:
    """A media file embedded as a data URI: ``<img>`` for images and GIFs, ``<video controls>`` for MP4,
    ``<audio controls>`` for WAV."""
    p = Path(path)
    mime = MIME.get(p.suffix.lower(), "application/octet-stream")
    data = base64.b64encode(p.read_bytes()).decode()
    if mime.startswith("audio/"):
        return f'<audio class="{css_class} mm-audio" controls src="data:{mime};base64,{data}"></audio>'
    if mime.startswith("video/"):
        return f'<video class="{css_class} mm-video" style="width:128px" controls loop muted src="data:{mime};base64,{data}"></video>'
    return f'<img class="{css_class}" style="width:128px" src="data:{mime};base64,{data}" alt="{escape(p.name)}">'


def render_table(table: ScoreTable) -> str:
    """The scores as HTML: one row per file (media, prompt, each reward's score, components and rank)."""
    head = "".join(f"<th>{escape(r)}</th>" for r in table.rewards)
    rows = []
    for i, f in enumerate(table.files):
        cells = []
        for j, s in enumerate(table.scores[i]):
            r = table.ranks[i][j]
            badge = f"<span class='mm-rank'>rank {r}/{len(table.files)}</span>" if r is not None else ""
            cells.append(f"<td>{scores_html([s])}{badge}</td>")
        rows.append(f"<tr class='mm-file'><td>{file_html(f)}<br><small>{escape(Path(f).name)}</small></td>"
                    f"<td>{escape(table.prompts[i])}</td>{''.join(cells)}</tr>")
    best = []
    for j, reward in enumerate(table.rewards):
        order = sorted((table.ranks[i][j], Path(table.files[i]).name) for i in range(len(table.files)) if table.ranks[i][j] is not None)
        best.append(f"<li><b>{escape(reward)}</b>: {escape(' > '.join(name for _, name in order)) or 'nothing scored'}</li>")
    return (f"<style>{APP_CSS}</style><table class='mm-pairs mm-score-table'><tr><th>media</th><th>prompt</th>{head}</tr>"
            f"{''.join(rows)}</table><p>ranking per reward (best first):</p><ul>{''.join(best)}</ul>")


@dataclass
class PairVerdict:
    """One reward's verdict on a pair: the scores of A and B and which it prefers."""

    reward: str
    score_a: Score
    score_b: Score

    @property
    def preferred(self) -> str:
        """``A``, ``B``, ``tie`` or ``n/a`` (a side not scored), in the reward's direction."""
        a, b = self.score_a, self.score_b
        if not (a.valid and b.valid):
            return "n/a"
        if a.score == b.score:
            return "tie"
        return "A" if (a.score > b.score) == a.higher_is_better else "B"

    @property
    def margin(self) -> float:
        """|score A - score B| (NaN when a side was not scored)."""
        if not (self.score_a.valid and self.score_b.valid):
            return math.nan
        return abs(self.score_a.score - self.score_b.score)


def compare_pair(resources: Resources, file_a: Any, file_b: Any, prompt: str, modality: str, rewards: Sequence[str],
                 progress: ProgressFn = noop_progress) -> list[PairVerdict]:
    """Which of two samples each reward prefers."""
    if not file_a or not file_b:
        raise ValueError("give both samples of the pair (A and B)")
    files = collect_files([file_a, file_b], "", modality, resources.settings.limits)
    table = score_files(resources, files, prompts_for(prompt, 2), modality, rewards, progress=progress)
    return [PairVerdict(reward, table.scores[0][j], table.scores[1][j]) for j, reward in enumerate(table.rewards)]


def render_pair(files: Sequence[str], verdicts: Sequence[PairVerdict]) -> str:
    """The pair and each reward's preference as HTML."""
    rows = "".join(
        f"<tr class='mm-verdict'><td>{escape(v.reward)}</td><td>{format_number(v.score_a.score)}</td>"
        f"<td>{format_number(v.score_b.score)}</td><td><b class='mm-preferred'>{v.preferred}</b></td>"
        f"<td>{format_number(v.margin)}</td></tr>" for v in verdicts)
    media = "".join(f"<td>{file_html(f)}<br><small>{label}: {escape(Path(f).name)}</small></td>" for label, f in zip("AB", files))
    return (f"<style>{APP_CSS}</style><table class='mm-pairs'><tr>{media}</tr></table>"
            f"<table class='mm-pairs'><tr><th>reward</th><th>A</th><th>B</th><th>prefers</th><th>margin</th></tr>{rows}</table>")


# ----------------------------------------------------------------------------- the Gradio app
class RewardsCallbacks:
    """The rewards app's event handlers (bound to one :class:`Resources`); tests call them directly."""

    def __init__(self, resources: Resources) -> None:
        self.resources = resources

    def score(self, modality: str, uploaded: Sequence[Any] | None, paths_text: str | None, prompt_text: str,
              reward_choices: list[str] | None, custom_rewards: str | None, progress: ProgressFn = noop_progress) -> str:
        """Score the files: the table as HTML (``gr.Error`` with the reason on bad input)."""
        import gradio as gr

        try:
            files = collect_files(uploaded, paths_text, modality, self.resources.settings.limits)
            table = score_files(self.resources, files, prompts_for(prompt_text, len(files)), modality,
                                selected_rewards(reward_choices, custom_rewards), progress=progress)
        except (ValueError, OSError, KeyError, RuntimeError) as err:
            raise gr.Error(str(err)) from None
        return render_table(table)

    def pair(self, modality: str, file_a: Any, file_b: Any, prompt_text: str, reward_choices: list[str] | None,
             progress: ProgressFn = noop_progress) -> str:
        """Each reward's preference between two samples, as HTML."""
        import gradio as gr

        try:
            verdicts = compare_pair(self.resources, file_a, file_b, prompt_text, modality, selected_rewards(reward_choices),
                                    progress)
        except (ValueError, OSError, KeyError, RuntimeError) as err:
            raise gr.Error(str(err)) from None
        return render_pair([_upload_path(file_a), _upload_path(file_b)], verdicts)


def build_app(settings: AppSettings | None = None, resources: Resources | None = None):
    """The rewards app as a ``gr.Blocks`` (not launched)."""
    import gradio as gr

    settings = settings or AppSettings()
    resources = resources or Resources(settings)
    callbacks = RewardsCallbacks(resources)
    with gr.Blocks(title="mmalign rewards") as demo:
        videos = "/".join(sorted(s.lstrip(".").upper() for s in SUFFIXES["video"]))
        gr.Markdown("# mmalign rewards\nScore media with several rewards at once. Images: PNG/JPEG/WebP; "
                    f"videos: {videos}; audio: 16-bit WAV.")
        with gr.Tab("score"):
            with gr.Row():
                modality = gr.Radio(MODALITIES, value="image", label="media kind")
                files = gr.File(file_count="multiple", label="upload media", elem_id="files")
                paths = gr.Textbox(label="or paths / glob patterns on the server (one per line)", lines=2, elem_id="paths")
            prompt = gr.Textbox(label="prompt (one for all files, or one line per file)", value="a red circle", lines=2,
                                elem_id="prompt")
            with gr.Row():
                rewards = gr.CheckboxGroup(settings.reward_choices, value=settings.rewards, label="rewards")
                custom = gr.Textbox(label="more rewards, one per line: name key=value ...", lines=2)
            button = gr.Button("Score", variant="primary", elem_id="score")
            table_html = gr.HTML(elem_id="table")

            def on_score(kind, uploaded, path_text, prompt_text, reward_choices, custom_rewards, progress=gr.Progress()):
                return callbacks.score(kind, uploaded, path_text, prompt_text, reward_choices, custom_rewards, progress)

            button.click(on_score, [modality, files, paths, prompt, rewards, custom], table_html)
        with gr.Tab("preference pair"):
            with gr.Row():
                pair_kind = gr.Radio(MODALITIES, value="image", label="media kind")
                file_a = gr.File(label="sample A", elem_id="file_a")
                file_b = gr.File(label="sample B", elem_id="file_b")
            pair_prompt = gr.Textbox(label="prompt", value="a red circle", elem_id="pair_prompt")
            pair_rewards = gr.CheckboxGroup(settings.reward_choices, value=settings.rewards, label="rewards")
            pair_button = gr.Button("Which does each reward prefer?", variant="primary", elem_id="pair_score")
            pair_html = gr.HTML(elem_id="pair_table")

            def on_pair(kind, a, b, prompt_text, reward_choices, progress=gr.Progress()):
                return callbacks.pair(kind, a, b, prompt_text, reward_choices, progress)

            pair_button.click(on_pair, [pair_kind, file_a, file_b, pair_prompt, pair_rewards], pair_html)
    return demo
