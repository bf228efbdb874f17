"""Support code of the web app, by role (the Streamlit pages in ``app/`` only lay these out):

- ``gaps``: what a predicted gap means (plain-language classes, the predictive density the interval comes from);
- ``figures``: the plotly figures of a result (intervals, draws and density, the 3D cell);
- ``cards``: the shipped models' cards as tables, and the benchmark plots that belong to them.

Uploads, limits, predictions and the batch table live in ``matbalora.app_support``, which also
re-exports the names above for existing callers.
"""
