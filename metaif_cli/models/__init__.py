"""The networks meta-learned by metaif: configs and pure functional forward passes (SPEC section 1)."""
