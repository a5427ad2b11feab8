"""The networks meta-learned by metaif: configs and pure functional forward passes (method §1)."""
