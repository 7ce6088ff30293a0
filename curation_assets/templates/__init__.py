"""The Jinja2 templates of the HTML pages (the curation report, the review page), shipped as package data.

Python prepares what a page shows; these templates hold how it looks (markup, CSS, JS).
Autoescaping is on for every template, so any text from a manifest, a project or an image id
lands in the page as text; only values a caller marks with ``markupsafe.Markup`` (JSON
already escaped for a ``<script>`` element) go in verbatim.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2


@cache
def environment() -> jinja2.Environment:
    """The one environment of the package's templates (built on first use, then shared)."""
    # Imported here: the modules that render pages are imported when the Definitions load,
    # and that must stay cheap; jinja2 is only needed once a page is written.
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("curation_assets", "templates"),
        autoescape=True,
        # Block tags on their own lines leave no blank lines behind: the pages keep the
        # line structure they had when they were built from Python strings.
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,  # a name the caller forgot fails loudly, not as ""
    )


def render(name: str, **context: Any) -> str:
    """Render the template ``name`` (for example ``"report.html.j2"``) with ``context``."""
    return environment().get_template(name).render(**context)


__all__ = ["environment", "render"]
