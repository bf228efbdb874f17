"""matbalora: band gaps with BaLoRA uncertainty."""
__version__ = "0.1.0"
