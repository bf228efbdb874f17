"""Inputs and table settings the app's pages share (imports Streamlit; only the pages in ``pages/`` use it)."""

from __future__ import annotations

import streamlit as st

from matbalora import app as sup
from matbalora.probabilities import check_window


def window_inputs(prefix: str) -> tuple[float, float] | None:
    """Two number inputs (keys ``{prefix}window_lo`` / ``{prefix}window_hi``, eV) for the gap window
    of ``p_window``, starting at ``sup.WINDOW``; None (with a warning) when they are not ``0 <= lo < hi``."""
    lo_default, hi_default = sup.WINDOW
    tip = "P(from ≤ gap ≤ to): the probability that the PBE gap lies in this window"
    left, right = st.columns(2)
    lo = left.number_input("Gap window from (eV)", min_value=0.0, max_value=50.0, value=lo_default, step=0.1,
                           key=f"{prefix}window_lo", help=tip)
    hi = right.number_input("to (eV)", min_value=0.0, max_value=50.0, value=hi_default, step=0.1,
                            key=f"{prefix}window_hi", help=tip)
    try:
        return check_window((lo, hi))
    except ValueError:
        st.warning(f"The window needs from < to (now {lo:g} and {hi:g} eV); no window probability is shown.")
        return None


def column_config(table) -> dict:
    """Column formats of a ``sup.batch_table``: gaps in eV to 3 decimals, probabilities to 2."""
    config = {}
    for c in table.columns:
        if c.startswith(("balora_p_", "ensemble_p_")):
            config[c] = st.column_config.NumberColumn(c, format="%.2f", help="probability")
        elif c.startswith(("balora_", "ensemble_", "window_")):
            config[c] = st.column_config.NumberColumn(c, format="%.3f", help="eV")
    return config
