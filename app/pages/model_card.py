"""The model cards of the shipped models and the benchmark plots, when they exist."""

import streamlit as st

from matbalora import app_support as sup

st.title("Model card & benchmarks")
for title, card in sup.model_cards().items():
    st.subheader(title)
    if "error" in card:
        st.warning(f"No model card: {card['error']}")
        continue
    member = card.get("member card", card)
    backbone = member.get("backbone") or {}
    calibration = card.get("calibration") or {}
    cols = st.columns(4)
    cols[0].metric("method", str(member.get("method", "?")))
    cols[1].metric("backbone", f"{backbone.get('name', '?')} {backbone.get('version', '')}")
    cols[2].metric("std scale k", f"{calibration.get('std_scale', 1.0):.3g}")
    cols[3].metric("std floor c (eV)", f"{calibration.get('std_floor', 0.0):.3g}")
    if "members" in card:
        st.caption(f"{len(card['members'])} members")
    if member.get("metrics"):
        st.write("**Metrics**")
        st.json(member["metrics"], expanded=True)
    with st.expander("Full model card (config.json)"):
        st.json(card, expanded=False)

st.subheader("Benchmark plots")
images = sup.benchmark_images()
if not images:
    st.info("No benchmark plots yet; they appear here once the benchmark scripts have written them to benchmarks/.")
for path in images:
    st.image(str(path), caption=str(path.relative_to(sup.REPO)), width="stretch")
