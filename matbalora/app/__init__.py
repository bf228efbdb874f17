"""Support code of the web app, by role (the Streamlit pages in ``app/`` only lay these out):

- ``gaps``: what a prediction means in words (P(metal), P(gap in a window), the interval) and the
  predictive distribution those probabilities come from;
- ``figures``: the plotly figures of a result (intervals, draws and density, the 3D cell);
- ``cards``: the shipped models' cards as tables, and the benchmark plots that belong to them;
- ``cached`` and ``widgets`` (import Streamlit, used by the pages only): the shared caches, and the
  gap-window inputs and table formats of both pages.

Uploads, limits, predictions and the batch table live in ``matbalora.app_support``, which also
re-exports the names above for existing callers.
"""
