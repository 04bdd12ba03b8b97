"""Sphinx configuration of the documentation site (`make docs`).

The pages stay Markdown (MyST); the API reference comes from the docstrings. Warnings are errors
(`make docs` passes -W): a broken reference or a missing page fails the build.
"""

from __future__ import annotations

import fastapi_async_sqlalchemy

project = "fastapi-async-sqlalchemy"
author = "fastapi-async-sqlalchemy contributors"
copyright = "the fastapi-async-sqlalchemy contributors"
release = version = fastapi_async_sqlalchemy.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
# The site is built from the repository root (`sphinx-build -c docs . <out>`), so the README,
# the changelog and the pages link to each other the same way on the forge and on the site.
root_doc = "docs/index"
include_patterns = ["README.md", "CHANGELOG.md", "docs/*.md"]
exclude_patterns = ["docs/_build", "**/_build"]

myst_heading_anchors = 3  # GitHub-style anchors for the pages' links to sections
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
nitpicky = False

html_theme = "furo"
html_title = f"fastapi-async-sqlalchemy {release}"
