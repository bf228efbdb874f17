"""Prediction defaults shared by the command line, the web app and the notebooks, so that the same
file gives the same interval everywhere (no torch import: the CLI reads these before parsing)."""

#: Monte-Carlo draws of the BaLoRA adapter weights per crystal (the recalibration was fitted with 16).
SAMPLES = 16
#: Central level of the reported intervals.
LEVEL = 0.9
