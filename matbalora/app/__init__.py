"""The web app: its Streamlit pages (``streamlit_app.py``, ``pages/``) and the support they lay
out, by role. Everything a page shows is computed here, without Streamlit:

- ``uploads``: files in -> checked structures under the page ``Limits``; the built-in examples;
- ``structure_view``: the structure's summary table and 3D view (bonds, polyhedra, cell axes);
- ``predictions``: both models on a structure, a page's structures under its time bound, the batch table;
- ``gaps``: what a prediction means in words, and the predictive distribution behind it;
- ``figures``: the plotly figures of a result (intervals, draws and density);
- ``cards``: the shipped models' cards as tables, and the benchmark plots that belong to them;
- ``launcher``: ``matbalora app``, serving the pages shipped in this package;
- ``cached`` and ``widgets`` (import Streamlit, used by the pages only): the shared caches, and the
  gap-window inputs and table formats of both pages.

The names the pages use are importable from here (``from matbalora import app``).
"""

from matbalora.app.cards import backbone_label, benchmark_images, model_cards
from matbalora.app.figures import interval_figure, samples_figure
from matbalora.app.gaps import probabilities_text, reading
from matbalora.app.launcher import APP_SCRIPT, launch, server_flags
from matbalora.app.predictions import (
    PREDICTION_KEYS,
    WINDOW,
    Models,
    Prediction,
    batch_table,
    load_models,
    out_of_time,
    predict_items,
    predict_structure,
)
from matbalora.app.structure_view import Bonds, cell_figure, find_bonds, summarize
from matbalora.app.uploads import (
    ACCEPTED,
    EXAMPLES,
    Item,
    Limits,
    collect,
    display_name,
    example,
    explain,
    read_upload,
    read_uploads,
    structure_key,
)

__all__ = [
    "ACCEPTED", "APP_SCRIPT", "EXAMPLES", "PREDICTION_KEYS", "WINDOW", "Bonds", "Item", "Limits", "Models", "backbone_label",
    "Prediction", "batch_table", "benchmark_images", "cell_figure", "collect", "display_name", "example", "explain",
    "find_bonds", "interval_figure", "load_models", "launch", "model_cards", "out_of_time", "predict_items",
    "predict_structure", "probabilities_text", "read_upload", "read_uploads", "reading", "samples_figure",
    "server_flags", "structure_key", "summarize",
]
