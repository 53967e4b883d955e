"""Frames: wordings that say "do this every time" without saying what to do, for training descriptions to be
embedded inside (``vllm-t2l train --frames SHARE``).

A static embedder averages word vectors, so a frame's words ("in every answer") weigh as much as the behaviour's.
When a frame occurs in the wordings of only some behaviours, the hypernetwork learns the frame as part of them:
"Talk like a pirate in every answer." then took the sports coach's voice, whose wordings often start "In every
answer, ...". Embedding a share of every behaviour's rows inside random frames makes frame words say nothing about
the behaviour. Only the embedding changes; the teacher's targets stay those of the plain description.
"""

from __future__ import annotations

FRAMES = (
    "In every answer, {lower}",
    "{bare} in every answer.",
    "Always: {text}",
    "From now on, {lower}",
    "For all of your replies: {text}",
    "{text} Do this in every response.",
    "Remember this for the whole conversation: {text}",
    "Instruction: {text}",
    "{bare}, always.",
    "Please, in each reply: {text}",
)


def framed(text: str, frame: str) -> str:
    """``text`` inside ``frame`` (one of ``FRAMES``), its first letter lowered where it no longer starts the
    sentence (kept for a word in capitals such as "CAPS") and its final stop dropped where the frame goes on."""
    text = text.strip()
    lower = text[:1].lower() + text[1:] if text[1:2].islower() else text
    bare = text.rstrip(".!")
    return frame.format(text=text, lower=lower, bare=bare)


def variants(texts: list[str]) -> dict[str, list[str]]:
    """Every text inside every frame."""
    return {t: [framed(t, f) for f in FRAMES] for t in texts}
