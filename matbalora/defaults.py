"""Prediction defaults shared by the command line, the web app and the notebooks, so that the same
file gives the same interval everywhere (no torch import: the CLI reads these before parsing)."""

#: Monte-Carlo draws of the BaLoRA adapter weights per crystal (the recalibration was fitted with 16).
SAMPLES = 16
#: Central level of the reported intervals.
LEVEL = 0.9
#: A crystal whose gap is at most this (eV) counts as a metal in ``p_metal``: Materials Project
#: metals have a PBE gap of exactly 0 eV, and gaps below 0.05 eV (2 % of matbench_mp_gap) are within
#: the smearing and k-point noise of the reference calculations.
METAL_THRESHOLD = 0.05
