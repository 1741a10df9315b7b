"""An offline CLIP BPE tokenizer built from the scene vocabulary.

The vocabulary holds CLIP's 256 byte-level base symbols (plain and with the
``</w>`` end-of-word suffix), the two CLIP special tokens, and one chain of
merges per scene word so that every caption word becomes a single token.
Unknown words still tokenize (into characters), exactly like CLIP's BPE.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

from distfd.embedded.scenes import VOCABULARY

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def build_vocab_and_merges(words: Iterable[str] = VOCABULARY) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style ``vocab`` (token -> id) and ordered ``merges`` (symbol pairs) for ``words``."""
    base = list(_bytes_to_unicode().values())
    tokens: list[str] = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        cur = symbols[0]
        for sym in symbols[1:]:
            merges.append((cur, sym))
            cur = cur + sym
            if cur not in seen:
                seen.add(cur)
                tokens.append(cur)
    merges = list(dict.fromkeys(merges))
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    """A :class:`CLIPTokenizer` for scene captions padded to ``max_length`` tokens."""
    vocab, merges = build_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def save_tokenizer(tokenizer: CLIPTokenizer, directory: str | Path) -> None:
    """Save so that ``CLIPTokenizer.from_pretrained(directory)`` reloads it.

    Besides ``tokenizer.json`` this writes the classic ``vocab.json`` and
    ``merges.txt`` files that the slow (pure Python) CLIP tokenizer reads.
    """
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    vocab, merges = build_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
