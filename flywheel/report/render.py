"""What every page shares: the Jinja2 environment (templates/, autoescape, the number filters) and
the formatting of scores, costs, tokens and durations, for the report files and the review app alike."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parent / "templates"



@lru_cache(maxsize=1)
def templates_env():
    """The Jinja2 environment shared by the report and the review server (autoescape always on)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=fmt_pct, num=fmt_num, tokens=fmt_tokens, cost=fmt_cost, duration=fmt_duration,
                       score=fmt_score, delta=fmt_delta)
    return env


def is_missing(value: Any) -> bool:
    """True for None and NaN: shown as a dash."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_pct(value: float | None) -> str:
    return "–" if is_missing(value) else f"{100 * value:.1f}%"


def fmt_num(value: float | None, digits: int = 3) -> str:
    return "–" if is_missing(value) else f"{value:.{digits}f}"


def fmt_score(value: float | None, metric: str = "pass_rate") -> str:
    return fmt_num(value) if metric == "mean_score" else fmt_pct(value)


def fmt_delta(value: float | None, metric: str = "pass_rate") -> str:
    if is_missing(value):
        return "–"
    sign = "+" if value > 0 else "−" if value < 0 else "±"
    return f"{sign}{abs(value):.3f}" if metric == "mean_score" else f"{sign}{100 * abs(value):.1f} pts"


def fmt_tokens(value: int | None) -> str:
    if not value:
        return "0"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def fmt_cost(value: float | None) -> str:
    if is_missing(value) or not value:
        return "–"
    return f"${value:.4f}" if value < 1 else f"${value:,.2f}"


def fmt_duration(value: float | None) -> str:
    if is_missing(value):
        return "–"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(round(value)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
