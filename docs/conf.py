"""Sphinx configuration for the blockops documentation.

Built by ``nox -s docs`` as ``sphinx-build -W --keep-going -b html docs
docs/_build/html`` (warnings are errors). The gallery runs every script in
``examples/`` at the reduced size selected by ``BLOCKOPS_EXAMPLE_QUICK=1`` so
the build stays fast; run a script by hand for the full-size version.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Gallery scripts read this to shrink their problem sizes (see tests/test_examples.py).
os.environ.setdefault("BLOCKOPS_EXAMPLE_QUICK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import blockops

project = "blockops"
author = "blockops developers"
copyright = "2025-2026, blockops developers"
version = release = blockops.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # serves MathJax from _static/mathjax, not a CDN
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**/*.ipynb"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"

# -- autodoc / autosummary / numpydoc -----------------------------------------
autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": True}
autodoc_typehints = "none"  # numpydoc sections carry the types
numpydoc_show_class_members = False  # autosummary lists members; avoids duplicate targets
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

nitpicky = False  # references to NumPy/SciPy/pylops objects in docstrings stay plain text

# -- math ---------------------------------------------------------------------
# MathJax 3 renders the :math: roles and math directives. sphinx-mathjax-offline
# (in the "docs" extra) ships MathJax 3.2 and sets ``mathjax_path`` to the copy
# it writes to ``_build/html/_static/mathjax/``, so the pages need no network.

# -- sphinx-gallery -----------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": ["../examples"],
    "gallery_dirs": ["auto_examples"],
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py",
    "within_subsection_order": "FileNameSortKey",
    "backreferences_dir": "gen_modules/backreferences",
    "doc_module": ("blockops",),
    "reference_url": {"blockops": None},
    "download_all_examples": False,
    "remove_config_comments": True,
    "plot_gallery": "True",
    "abort_on_example_error": False,
    "only_warn_on_example_error": False,
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "write_computation_times": False,  # no sg_execution_times.rst in the source tree
    # The examples save PNGs only in a headless run outside sphinx-gallery (their
    # hidden show_figures helper); here the matplotlib scraper captures the figures.
}

# -- HTML ---------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = "blockops"
html_static_path = ["_static"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_sidebars = {"**": ["sidebar-nav-bs"]}
