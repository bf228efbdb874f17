"""The shipped models' cards: test metrics, the data and recipe they were trained with, and the
benchmark plots made from them. Everything is read from the model folders when the page opens."""

import streamlit as st

from matbalora.api import models_dir
from matbalora.app import cached, cards

st.title("Model cards")
folder = models_dir()
st.caption(f"Read from the model folders in `{folder}` (`config.json`, `ensemble.json`). Test metrics are on "
           "held-out crystals, after the recalibration fitted on the validation split; the raw cards below "
           "also hold the validation and uncalibrated numbers.")
for title, card in cached.model_cards(str(folder)).items():
    st.header(title)
    if "error" in card:
        st.warning(f"No model card: {card['error']}")
        continue
    table = cards.metrics_table(card)
    if table.empty:
        st.info("This card holds no test metrics.")
    else:
        st.subheader("Test metrics")
        st.table(table)
        if any(c.startswith("metals") for c in table.columns):
            st.caption("Metals' column derived from the card: (n · all − n_non-metals · non-metals) / n_metals, for the "
                       "metrics that are means over crystals.")
    intervals = cards.card_intervals(card)
    if not intervals.empty:
        st.caption("How sure these numbers are: 95 % bootstrap intervals over the test crystals (another test set of the "
                   "same size would land in about this range; `matbalora.metrics.bootstrap_intervals`).")
        st.table(intervals)
    more = cards.other_numbers(card)
    if more:
        with st.expander("More numbers from the card's test metrics"):
            st.table({"value": more})
    st.subheader("Data and recipe")
    st.table({"value": cards.recipe_table(card)})
    plots = cards.card_plots(card)
    if plots:
        for col, (png, caption) in zip(st.columns(len(plots)), plots):
            col.image(str(png), caption=caption, width="stretch")
    else:
        found = cards.benchmark_method(card)
        st.info("No calibration, parity or sparsification plot belongs to this model: "
                + (f"`{found[0].name}` scored it as `{found[1]}` but lists no plots of it." if found else
                   "no results file under benchmarks/results scored a model with this card's test metrics.")
                + " `python benchmarks/mp_gap.py evaluate` writes them.")
    with st.expander("Raw model card (JSON)"):
        st.json(card, expanded=False)
