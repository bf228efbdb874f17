"""The Streamlit caches the app's pages share (one model load per server, one prediction per
structure and settings), so a structure predicted on one page is not predicted again on another.
Imports Streamlit; only the pages in ``pages/`` import this module."""

from __future__ import annotations

import streamlit as st

from matbalora import app as sup

LIMITS = sup.Limits()


@st.cache_resource(show_spinner="Loading the BaLoRA model and the deep ensemble (once per server)…")
def load_models(folder: str) -> sup.Models:
    return sup.load_models(folder)


@st.cache_data(max_entries=256, show_spinner=False)
def read_upload(name: str, data: bytes) -> list[sup.Item]:
    return sup.read_upload(name, data, limits=LIMITS)


@st.cache_data(max_entries=512, show_spinner=False)
def summarize(key: str, _structure) -> dict:
    return sup.summarize(_structure)


@st.cache_data(max_entries=512, show_spinner=False)
def bonds(key: str, _structure) -> sup.Bonds:
    return sup.find_bonds(_structure)


@st.cache_data(max_entries=2048, show_spinner=False)
def predict(folder: str, key: str, _structure, samples: int, level: float,
            window: tuple[float, float] | None = None) -> sup.Prediction:
    return load_models(folder).predict(_structure, samples=samples, level=level, window=window)


@st.cache_data(max_entries=8, show_spinner=False)
def model_cards(folder: str) -> dict[str, dict]:
    return sup.model_cards(folder)


def read_files(uploads) -> list[sup.Item]:
    """The structures of a page's uploads (``st.file_uploader`` files), bounded by ``LIMITS``."""
    return sup.read_uploads([(f.name, f.getvalue()) for f in uploads or []], limits=LIMITS, read=read_upload)


def predict_all(folder: str, items: list[sup.Item], *, samples: int, level: float,
                window: tuple[float, float] | None = None) -> dict[str, sup.Prediction]:
    """Predictions (``p_window`` for ``window``, eV) of the readable ``items`` under the page's time
    bound, with a progress bar."""
    good = [item for item in items if item.structure is not None]
    bar = st.progress(0.0, text="Predicting…") if len(good) > 1 else None
    preds = sup.predict_items(good, lambda item: predict(folder, item.key, item.structure, samples, level, window), level=level,
                              limits=LIMITS, progress=bar and (lambda done, total: bar.progress(done / total, text=f"Predicted {done} of {total}")))
    if bar is not None:
        bar.empty()
    return preds
