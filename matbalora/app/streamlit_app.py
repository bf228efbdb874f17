"""matbalora web app: band gaps with BaLoRA and deep-ensemble uncertainty.

Run with ``matbalora app`` (or ``streamlit run matbalora/app/streamlit_app.py``); the models come
from the shipped models (``matbalora.api.models_dir``) or ``$MATBALORA_MODELS``. Every number shown
is computed by ``matbalora.app``; these pages only lay it out.
"""

import streamlit as st

st.set_page_config(page_title="matbalora: band gaps with uncertainty", page_icon=":material/deployed_code:", layout="wide")
page = st.navigation([
    st.Page("pages/predict.py", title="Predict", icon=":material/science:", default=True),
    st.Page("pages/screen.py", title="Screen many", icon=":material/table_view:"),
    st.Page("pages/model_card.py", title="Model card & benchmarks", icon=":material/description:"),
])
page.run()
