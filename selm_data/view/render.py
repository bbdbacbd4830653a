"""Untrusted text made safe for a page: every model or dataset text is rendered here or escaped
by Jinja2's autoescaping, never written into a page raw.

Markdown goes through markdown-it-py's `js-default` preset, which escapes raw HTML (a
response's `<script>` shows as text). Links keep only http(s) and mailto targets and open
without a referrer; images are not rendered (an image would be fetched from outside the
machine the moment a page opens), so `![alt](url)` stays text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from markupsafe import Markup

from selm_data.publish.stats import fmt_num, fmt_pct

LINK_SCHEMES = ("http://", "https://", "mailto:")


class SafeMarkdown(MarkdownIt):
    """CommonMark without raw HTML, images or links other than LINK_SCHEMES."""

    def __init__(self) -> None:
        super().__init__("js-default")
        self.disable("image")
        self.add_render_rule("link_open", _link_open)

    def validateLink(self, url: str) -> bool:
        return url.strip().lower().startswith(LINK_SCHEMES)


def _link_open(renderer: Any, tokens: Sequence[Token], idx: int, options: OptionsDict,
               env: EnvType) -> str:
    tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
    result: str = renderer.renderToken(tokens, idx, options, env)
    return result


_MARKDOWN = SafeMarkdown()


def markdown(text: str | None) -> Markup:
    """`text` as safe HTML (markdown rendered, HTML in it escaped)."""
    return Markup(_MARKDOWN.render(text or ""))


def num(value: float | None, digits: int = 3) -> str:
    return fmt_num(value, digits)


def pct(value: float | None) -> str:
    return fmt_pct(value)


def short(value: str | None, n: int = 12) -> str:
    """An id or fingerprint shortened for a table cell (the link keeps the whole id)."""
    return "" if value is None else value[:n]


def shade(rate: float | None) -> str:
    """A CSS class for a win rate, from w0 (0-10%) to w10 (100%): a heat map without inline
    styles, which the Content-Security-Policy forbids."""
    return "" if rate is None else f"w{round(rate * 10)}"


__all__ = ["SafeMarkdown", "markdown", "num", "pct", "shade", "short"]
