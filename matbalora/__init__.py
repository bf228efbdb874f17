"""matbalora: band gaps with honest uncertainty from BaLoRA adapters on pretrained CHGNet.

>>> import matbalora
>>> model = matbalora.load_model()            # shipped BaLoRA-CHGNet band-gap model
>>> model.predict([structure], samples=16)    # DataFrame: band_gap, std, lower, upper (eV)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_model", "load_ensemble", "screen", "__version__"]


def __getattr__(name: str):  # lazy: importing matbalora does not import torch or CHGNet
    if name in ("load_model", "load_ensemble"):
        from matbalora import api

        return getattr(api, name)
    if name == "screen":
        from matbalora.screening import screen

        return screen
    raise AttributeError(f"module 'matbalora' has no attribute {name!r}")
