"""Upload crystals (or pick examples) and compare the BaLoRA and deep-ensemble band-gap intervals."""

import streamlit as st

from matbalora import app as sup
from matbalora.api import models_dir
from matbalora.app import cached, widgets
from matbalora.defaults import LEVEL, METAL_THRESHOLD, SAMPLES

LIMITS = cached.LIMITS
PLOTLY = {"displaylogo": False}

st.title("Band gaps with honest uncertainty")
folder = str(models_dir())
try:
    models = cached.load_models(folder)
except (OSError, ValueError) as exc:
    st.error(f"The models could not be loaded: {exc}")
    st.stop()
st.caption(f"PBE band gap predicted by BaLoRA (Bayesian low-rank adapters on pretrained {sup.backbone_label(models.model)}), "
           "next to a deep ensemble of LoRA models. PBE underestimates measured gaps.")

with st.sidebar:
    uploads = st.file_uploader("Crystal structure files", accept_multiple_files=True, key="uploads",
                               max_upload_size=LIMITS.max_file_mb, help=f"Accepted: {sup.ACCEPTED}.")
    chosen = st.multiselect("Built-in examples", sup.EXAMPLES, key="examples")
    st.caption(LIMITS.describe())
    samples = st.slider("Monte-Carlo samples (BaLoRA)", 4, 256, SAMPLES, step=4, key="samples",
                        help=f"{SAMPLES} is the command line's default, so both give the same interval")
    level = st.slider("Interval level", 0.50, 0.99, LEVEL, step=0.01, key="level")
    window = widgets.window_inputs("")

items = sup.collect(cached.read_files(uploads) + [sup.example(name) for name in chosen], limits=LIMITS)
for item in items:
    if item.structure is None:
        st.error(f"**{item.source}** ({item.id}): {item.error}")
good = [item for item in items if item.structure is not None]
if not good:
    st.info("Upload CIF, POSCAR or extended-XYZ files in the sidebar, or pick a built-in example.")
    st.stop()

preds = cached.predict_all(folder, good, samples=samples, level=level, window=window)

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
        st.table({k: str(v) for k, v in cached.summarize(item.key, item.structure).items()})
        bonds = cached.bonds(item.key, item.structure)
        st.plotly_chart(sup.cell_figure(item.structure, bonds), config=PLOTLY, key="cell")
        st.caption(f"Bonds: {bonds.strategy}; polyhedra around cations with 4 to 8 neighbours. "
                   "Bonds leaving the cell stop halfway; drag to rotate, scroll to zoom.")
    with right:
        if pred.error:
            st.error(f"No prediction: {pred.error}")
        else:
            b, e = pred.balora, pred.ensemble
            pct = f"{100 * level:g}%"
            st.markdown(f"### Predicted band gap: {b['band_gap']:.2f} eV")
            st.info(f"Reading: {sup.reading(b, level=level, window=window)}.")
            c1, c2 = st.columns(2)
            for col, name, row in ((c1, "BaLoRA", b), (c2, "Deep ensemble (LoRA)", e)):
                col.metric(name, f"{row['band_gap']:.2f} eV")
                col.caption(f"{pct} interval: {row['lower']:.2f} – {row['upper']:.2f} eV (σ = {row['std']:.2f} eV)")
                col.caption(sup.probabilities_text(row, window))
            st.plotly_chart(sup.interval_figure(pred), config=PLOTLY, key="intervals")
            st.plotly_chart(sup.samples_figure(pred), config=PLOTLY, key="samples_hist")
            scaler = models.model.scaler
            classes = models.model.mondrian and models.model.mondrian.classes
            interval = (f"band gap ± q σ with q fitted on validation for each predicted class ({classes[0]}; gap "
                        f"{', '.join(classes[1:])} eV), so it holds {pct} per class" if classes else
                        f"the central {pct} of the Gaussian N(band gap, σ²)")
            st.caption(f"The draws' raw spread s is recalibrated on validation as σ = √((k s)² + c²) with k = {scaler.factor or 1.0:.3g} "
                       f"and c = {scaler.floor:.2f} eV. The curve is the predictive distribution: the draws, each widened so that "
                       f"together they have that σ, with the mass below 0 eV at 0 eV; P(metal) is its mass at or below "
                       f"{METAL_THRESHOLD:g} eV (the grey band) and P(window) its mass in the window. The interval is {interval}, "
                       f"clipped at 0 eV. Computed in {pred.seconds:.2f} s ({samples} samples; cached for repeat views).")
with tab_all:
    table = sup.batch_table([(item, preds.get(item.id)) for item in items], window=window)
    st.dataframe(table, hide_index=True, column_config=widgets.column_config(table), key="table")
    st.download_button("Download CSV", table.to_csv(index=False), file_name="matbalora_band_gaps.csv",
                       mime="text/csv", key="download")
    st.caption("Many structures at once: the **Screen many** page.")
