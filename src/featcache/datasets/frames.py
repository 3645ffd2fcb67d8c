"""The one definition of a numbered frame's identity, shared by every stage that meets it.

ScanNet exports name the same frame ``11.jpg`` (SensReader) or ``000011.jpg`` (the 25k-frames
release). :func:`frame_number` turns either spelling into the frame's number; the grid stages
key an all-digit image stem by that number (``"11"``), ``build_uv_index`` and
``sample_point_feats`` key a frame ``<scene>/frame_<number:06d>`` (:func:`frame_key`) and find
its grid by the same number, so both spellings meet whatever the export.
"""

from __future__ import annotations


def frame_number(stem: str) -> int | None:
    """The number of a frame stem made only of ASCII digits (``"000011"`` and ``"11"`` -> 11),
    else ``None``."""
    return int(stem) if stem.isascii() and stem.isdigit() else None


def frame_key(scene: str, number: int) -> str:
    """Output key of frame ``number`` of ``scene`` in the ScanNet stages:
    ``<scene>/frame_<number:06d>``."""
    return f"{scene}/frame_{number:06d}"


def parse_frame_key(key: str) -> tuple[str, int] | None:
    """``(scene, number)`` of a :func:`frame_key`, else ``None``."""
    scene, sep, frame = key.partition("/")
    number = frame_number(frame.removeprefix("frame_")) if frame.startswith("frame_") else None
    return (scene, number) if sep and number is not None and "/" not in frame else None
