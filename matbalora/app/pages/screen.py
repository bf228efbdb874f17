"""Screen many structures: upload files (or one extended-XYZ with many frames), get a sortable table
of both models' gaps, intervals, P(metal) and P(gap in a target window), most likely in the window
first; download it as CSV. Bounded like the single view."""

import streamlit as st

from matbalora import app as sup
from matbalora.api import models_dir
from matbalora.app import cached, widgets
from matbalora.defaults import LEVEL, SAMPLES

LIMITS = cached.LIMITS

st.title("Screen many structures")
st.caption("Every structure is predicted by BaLoRA and by the deep ensemble; the table starts with the structures most "
           "likely to have a gap in the target window (balora_p_window); click a column header to sort, "
           "download the table as CSV. For more than a page's worth, use `matbalora screen` (resumable, "
           "chunked, on a cluster if you have one).")
folder = str(models_dir())
try:
    cached.load_models(folder)
except (OSError, ValueError) as exc:
    st.error(f"The models could not be loaded: {exc}")
    st.stop()

with st.sidebar:
    uploads = st.file_uploader("Structure files (many, or one extended XYZ)", accept_multiple_files=True,
                               key="batch_uploads", max_upload_size=LIMITS.max_file_mb, help=f"Accepted: {sup.ACCEPTED}.")
    st.caption(LIMITS.describe())
    samples = st.slider("Monte-Carlo samples (BaLoRA)", 4, 256, SAMPLES, step=4, key="batch_samples",
                        help=f"{SAMPLES} is the command line's default, so both give the same interval")
    level = st.slider("Interval level", 0.50, 0.99, LEVEL, step=0.01, key="batch_level")
    window = widgets.window_inputs("batch_")

items = sup.collect(cached.read_files(uploads), limits=LIMITS)
if not items:
    st.info("Upload structure files in the sidebar: many CIF/POSCAR files, or an extended-XYZ file with many frames.")
    st.stop()
preds = cached.predict_all(folder, items, samples=samples, level=level, window=window)
table = sup.batch_table([(item, preds.get(item.id)) for item in items], window=window)
done = int(table["balora_band_gap"].notna().sum())
st.markdown(f"**{done} of {len(items)} structures predicted** ({100 * level:g}% intervals, {samples} BaLoRA samples"
            + (f", P(gap in {window[0]:g}–{window[1]:g} eV)" if window is not None else "") + ")"
            + (f"; {len(items) - done} could not be, the reason is in the message column." if done < len(items) else "."))
order = ("balora_p_window", False) if window is not None else ("balora_band_gap", True)
st.dataframe(table.sort_values(order[0], ascending=order[1], na_position="last", kind="stable"), hide_index=True,
             column_config=widgets.column_config(table), key="batch_table")
st.download_button("Download CSV", table.to_csv(index=False), file_name="matbalora_screen.csv", mime="text/csv",
                   key="batch_download")
