"""SegRefine: fine-tune cell segmentation on a few annotated patches and
segment whole Stereo-seq slides into a single-cell expression matrix.

The package is the tested library behind the Snakemake rules; every step the
rules call is also a subcommand of ``segrefine`` (``python -m segrefine``).
Modules must import on Python 3.8 (the stereopy env), so they use
``from __future__ import annotations`` and import heavy frameworks lazily.
"""

__version__ = "0.1.0"


class SegRefineError(RuntimeError):
    """An error a user can act on: the message names the file and the problem."""
