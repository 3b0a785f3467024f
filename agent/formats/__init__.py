"""Prompt formats: ``qwen-tir``, ``qwen-cot`` and ``dotamath``."""

from tirforge.agent.formats.base import Format, MessageStyle, Reflection, TurnEvent
from tirforge.agent.formats.dotamath import DOTAMATH
from tirforge.agent.formats.qwen_cot import QWEN_COT
from tirforge.agent.formats.qwen_tir import QWEN_TIR

FORMATS: dict[str, Format] = {f.name: f for f in (QWEN_TIR, QWEN_COT, DOTAMATH)}


def get_format(name: str | Format) -> Format:
    """The format called ``name`` (a Format passes through)."""
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}") from None


__all__ = ["FORMATS", "Format", "MessageStyle", "Reflection", "TurnEvent", "get_format"]
