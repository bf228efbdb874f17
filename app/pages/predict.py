"""Upload crystals (or pick examples) and compare the BaLoRA and deep-ensemble band-gap intervals."""

import logging
import time

import streamlit as st

from matbalora import app_support as sup
from matbalora.api import models_dir

log = logging.getLogger("matbalora.app")
LIMITS = sup.Limits()
PLOTLY = {"displaylogo": False}


@st.cache_resource(show_spinner="Loading the BaLoRA model and the deep ensemble (once per server)…")
def load_models(folder: str) -> sup.Models:
    return sup.load_models(folder)


@st.cache_data(max_entries=256, show_spinner=False)
def read_upload(name: str, data: bytes) -> list[sup.Item]:
    return sup.read_upload(name, data, limits=LIMITS)


@st.cache_data(max_entries=512, show_spinner=False)
def summarize(key: str, _structure) -> dict:
    return sup.summarize(_structure)


@st.cache_data(max_entries=2048, show_spinner=False)
def predict(folder: str, key: str, _structure, samples: int, level: float) -> sup.Prediction:
    return load_models(folder).predict(_structure, samples=samples, level=level)


st.title("Band gaps with honest uncertainty")
st.caption("PBE band gap predicted by BaLoRA (Bayesian low-rank adapters on pretrained CHGNet), "
           "next to a deep ensemble of 5 LoRA models. PBE underestimates measured gaps.")
folder = str(models_dir())
try:
    load_models(folder)
except (OSError, ValueError) as exc:
    st.error(f"The models could not be loaded: {exc}")
    st.stop()

with st.sidebar:
    uploads = st.file_uploader("Crystal structure files", accept_multiple_files=True, key="uploads",
                               max_upload_size=LIMITS.max_file_mb, help=f"Accepted: {sup.ACCEPTED}.")
    chosen = st.multiselect("Built-in examples", sup.EXAMPLES, key="examples")
    st.caption(LIMITS.describe())
    samples = st.slider("Monte-Carlo samples (BaLoRA)", 4, 256, 32, step=4, key="samples")
    level = st.slider("Interval level", 0.50, 0.99, 0.90, step=0.01, key="level")

items = sup.read_uploads([(f.name, f.getvalue()) for f in uploads or []], limits=LIMITS, read=read_upload)
items = sup.collect(items + [sup.example(name) for name in chosen], limits=LIMITS)
for item in items:
    if item.structure is None:
        st.error(f"**{item.source}** ({item.id}): {item.error}")
good = [item for item in items if item.structure is not None]
if not good:
    st.info("Upload CIF, POSCAR or extended-XYZ files in the sidebar, or pick a built-in example.")
    st.stop()

preds: dict[str, sup.Prediction | None] = {}
bar = st.progress(0.0, text="Predicting…") if len(good) > 1 else None
started = time.monotonic()
for n, item in enumerate(good):
    if spent := sup.out_of_time(started, limits=LIMITS):
        preds[item.id] = sup.Prediction({}, {}, level=level, error=spent)
        continue
    try:
        preds[item.id] = predict(folder, item.key, item.structure, samples, level)
    except Exception as exc:  # one failing structure must not take the page down
        log.exception("prediction failed for %s", item.id)
        preds[item.id] = sup.Prediction({}, {}, level=level, error=f"prediction failed: {type(exc).__name__}: {exc}")
    if bar is not None:
        bar.progress((n + 1) / len(good), text=f"Predicted {n + 1} of {len(good)}")
if bar is not None:
    bar.empty()

tab_one, tab_all = st.tabs(["Structure", f"All structures ({len(items)})"])
with tab_one:
    ids = [item.id for item in good]
    sid = st.selectbox("Structure", ids, key="selected") if len(ids) > 1 else ids[0]
    item = good[ids.index(sid)]
    pred = preds[item.id]
    left, right = st.columns([2, 3])
    with left:
        formula = item.structure.composition.reduced_formula
        st.subheader(formula if item.id == formula else f"{item.id} · {formula}")
        st.table({k: str(v) for k, v in summarize(item.key, item.structure).items()})
        st.plotly_chart(sup.cell_figure(item.structure), config=PLOTLY, key="cell")
    with right:
        if pred.error:
            st.error(f"No prediction: {pred.error}")
        else:
            b, e = pred.balora, pred.ensemble
            pct = f"{100 * level:g}%"
            st.markdown(f"### Predicted band gap: {b['band_gap']:.2f} eV")
            st.info(f"Reading: {sup.reading(b['band_gap'], b['lower'], b['upper'])}.")
            c1, c2 = st.columns(2)
            for col, name, row in ((c1, "BaLoRA", b), (c2, "Deep ensemble (5 LoRA)", e)):
                col.metric(name, f"{row['band_gap']:.2f} eV")
                col.caption(f"{pct} interval: {row['lower']:.2f} – {row['upper']:.2f} eV (σ = {row['std']:.2f} eV)")
            st.plotly_chart(sup.interval_figure(pred), config=PLOTLY, key="intervals")
            st.plotly_chart(sup.samples_figure(pred), config=PLOTLY, key="samples_hist")
            st.caption(f"Computed in {pred.seconds:.2f} s ({samples} samples; cached for repeat views).")
with tab_all:
    table = sup.batch_table([(item, preds.get(item.id)) for item in items])
    gaps = {c: st.column_config.NumberColumn(c, format="%.3f", help="eV") for c in table.columns if c.startswith(("balora_", "ensemble_"))}
    st.dataframe(table, hide_index=True, column_config=gaps, key="table")
    st.download_button("Download CSV", table.to_csv(index=False), file_name="matbalora_band_gaps.csv",
                       mime="text/csv", key="download")
