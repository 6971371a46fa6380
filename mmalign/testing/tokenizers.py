"""Tokenizers built offline, for tiny test models and the embedded world.

- CLIP: the real CLIP byte-level BPE, rebuilt from the vocabulary file that open_clip ships
  (``bpe_simple_vocab_16e6.txt.gz``); optionally truncated to the first ``num_merges`` merges so tiny
  models get a small embedding table. Tokenisation is exactly CLIP's for the kept merges.
- T5 / UMT5: a Unigram tokenizer trained with the ``tokenizers`` library on a small built-in corpus,
  wrapped as a transformers ``T5Tokenizer``. Not the published sentencepiece model (which cannot be
  downloaded here), but the same interface, special tokens and padding behaviour.
- RoBERTa-style BPE (for CLAP text encoders) built from the CLIP merges.

Everything is cached per process and per argument set: building takes milliseconds after the first call.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from pathlib import Path

CLIP_FULL_MERGES = 48894  # 49152 - 256 - 2: the merges CLIP uses (vocab 49408 = 512 + merges + 2 specials)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode mapping (Radford et al., GPT-2 ``encoder.py``)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


@functools.lru_cache(maxsize=None)
def clip_vocab_and_merges(num_merges: int = CLIP_FULL_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary (token -> id) and its first ``num_merges`` merges, from open_clip's file."""
    import open_clip

    if not 0 <= num_merges <= CLIP_FULL_MERGES:
        raise ValueError(f"num_merges must be in [0, {CLIP_FULL_MERGES}], got {num_merges}")
    path = Path(open_clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : num_merges + 1]]
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_vocab_size(num_merges: int = CLIP_FULL_MERGES) -> int:
    return 512 + num_merges + 2


_CACHE_VERSION = "v1"  # bump when a builder's output changes


def _cached_dir(key: str, write) -> str:
    """A directory built once per machine by ``write(path)`` under the mmalign cache
    (``$MMALIGN_CACHE`` or ``~/.cache/mmalign``), written to a temp dir and renamed into place so
    concurrent processes never see a half-written tokenizer; falls back to a temp dir if unwritable."""
    root = Path(os.environ.get("MMALIGN_CACHE") or Path.home() / ".cache" / "mmalign") / "tokenizers"
    final = root / f"{key}-{_CACHE_VERSION}"
    if (final / ".complete").is_file():
        return str(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    except OSError:
        tmp = Path(tempfile.mkdtemp(prefix=f"mmalign-{key}-"))
        write(tmp)
        return str(tmp)
    write(tmp)
    (tmp / ".complete").touch()
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race: use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


@functools.lru_cache(maxsize=None)
def clip_tokenizer_dir(num_merges: int = CLIP_FULL_MERGES, model_max_length: int = 77) -> str:
    """A directory holding a CLIP tokenizer (``vocab.json``, ``merges.txt``) loadable by
    ``CLIPTokenizer.from_pretrained``; built once per machine in the mmalign cache."""
    return _cached_dir(
        f"clip-{num_merges}-{model_max_length}",
        lambda d: save_clip_tokenizer(d, num_merges=num_merges, model_max_length=model_max_length),
    )


def save_clip_tokenizer(directory: str | os.PathLike, num_merges: int = CLIP_FULL_MERGES, model_max_length: int = 77) -> None:
    """Write a CLIP tokenizer to ``directory`` (for shipping next to a model's weights)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(num_merges)
    # transformers 5 ignores vocab_file=/merges_file= in the constructor: pass the data itself.
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
    tok.save_pretrained(str(directory))


def clip_tokenizer(num_merges: int = CLIP_FULL_MERGES, model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` built offline (see module docstring)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_dir(num_merges, model_max_length))


_T5_CORPUS = (
    "a photo of a cat sitting on a red chair next to a window",
    "three blue triangles and a green square on a white background",
    "a dog running in the park under a bright blue sky",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of fruit: apples, oranges and bananas on a wooden table",
    "the quick brown fox jumps over the lazy dog",
    "a red circle left of a green square, a yellow star above a purple hexagon",
    "a car driving through a city at night with neon lights",
    "piano music with soft rain in the background, a bird singing",
    "one two three four five six seven eight nine ten small large big tiny",
    "left right above below top bottom middle center near far moving slowly quickly",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"()-_/",
)


@functools.lru_cache(maxsize=None)
def t5_tokenizer_dir(vocab_size: int = 256, model_max_length: int = 512) -> str:
    """A directory with a small T5-style Unigram tokenizer trained on a built-in corpus.

    Special tokens follow T5: ``<pad>``=0, ``</s>``=1, ``<unk>``=2; no ``<extra_id_*>`` sentinels.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"),
    )
    tok.train_from_iterator(list(_T5_CORPUS) * 4, trainer=trainer)
    wrapped = T5Tokenizer(tokenizer_object=tok, extra_ids=0, model_max_length=model_max_length)
    return _cached_dir(f"t5-{vocab_size}-{model_max_length}", lambda d: wrapped.save_pretrained(str(d)))


def t5_tokenizer(vocab_size: int = 256, model_max_length: int = 512):
    """A ``transformers.T5Tokenizer`` built offline (see module docstring). Also serves UMT5 (Wan)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(t5_tokenizer_dir(vocab_size, model_max_length))


#: RoBERTa's special tokens, at RoBERTa's ids (<s>=0, <pad>=1, </s>=2, <unk>=3; <mask> last)
_ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def _roberta_vocab_and_merges(num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A RoBERTa-style byte-level BPE vocabulary from CLIP's first ``num_merges`` merges.

    CLIP marks word ends with ``</w>`` while RoBERTa marks word starts with ``Ġ``; the merges that
    involve ``</w>`` cannot be expressed in RoBERTa's scheme and are dropped. The rest are ordinary
    byte-level merges (``t h -> th``), so tokenisation is a genuine byte-level BPE that covers any
    text (every byte has a token).
    """
    clip_vocab, clip_merges = clip_vocab_and_merges(num_merges)
    byte_tokens = list(clip_vocab)[:256]  # CLIP's vocabulary starts with the 256 byte symbols
    merges = [m for m in clip_merges if not (m[0].endswith("</w>") or m[1].endswith("</w>"))]
    vocab: dict[str, int] = {}
    for tok in (*_ROBERTA_SPECIALS, *byte_tokens, *("".join(m) for m in merges), "<mask>"):
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


@functools.lru_cache(maxsize=None)
def roberta_tokenizer_dir(num_merges: int = 1000, model_max_length: int = 77) -> str:
    """A directory holding a RoBERTa tokenizer loadable by ``RobertaTokenizer.from_pretrained``.

    Built once per process and argument set in a temp dir (the first call imports open_clip to read
    the CLIP merges; later calls are free).
    """
    from transformers import RobertaTokenizer

    vocab, merges = _roberta_vocab_and_merges(num_merges)
    # transformers 5 takes the vocabulary and merges as data (vocab_file= is ignored)
    tok = RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    return _cached_dir(f"roberta-{num_merges}-{model_max_length}", lambda d: tok.save_pretrained(str(d)))


def roberta_tokenizer(num_merges: int = 1000, model_max_length: int = 77):
    """A fresh ``transformers.RobertaTokenizer`` built offline (see :func:`roberta_tokenizer_dir`)."""
    from transformers import RobertaTokenizer

    return RobertaTokenizer.from_pretrained(roberta_tokenizer_dir(num_merges, model_max_length))


def tokenizer_vocab_size(tokenizer) -> int:
    """The number of ids a text encoder's embedding must cover for ``tokenizer``."""
    return len(tokenizer)


__all__ = [
    "CLIP_FULL_MERGES",
    "clip_tokenizer",
    "clip_tokenizer_dir",
    "clip_vocab_and_merges",
    "clip_vocab_size",
    "roberta_tokenizer",
    "roberta_tokenizer_dir",
    "save_clip_tokenizer",
    "t5_tokenizer",
    "t5_tokenizer_dir",
    "tokenizer_vocab_size",
]
_ = json  # json kept for callers writing tokenizer files by hand
