"""mkdocs hook: the Sphinx roles of mlpug's docstrings (``:class:`~mlpug.data.DataSource```) as links.

The docstrings are written for Sphinx as well; mkdocstrings renders a role as the text ``:class:`` before the code.
This hook drops the role and, for a dotted name, makes the code an optional cross-reference that mkdocs-autorefs
resolves when the object is documented on the site (``~`` shows the last name only, as in Sphinx); an unresolved
one stays plain code, without a warning.
"""

import re

_ROLE = re.compile(r":(?:class|mod|func|meth|data|attr|exc|obj):<code>(?P<tilde>~?)(?P<name>[\w.]+)</code>")


def _replace(match: re.Match) -> str:
    name = match["name"]
    shown = name.rsplit(".", 1)[-1] if match["tilde"] else name
    if "." not in name:
        return f"<code>{shown}</code>"
    return f'<autoref identifier="{name}" optional><code>{shown}</code></autoref>'


def on_page_content(html, page, config, files):
    return _ROLE.sub(_replace, html)
