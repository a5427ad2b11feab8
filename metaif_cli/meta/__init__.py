"""The meta-learners as pure functions of ``(lam, task)``: MAML, ANIL, iMAML (SPEC section 1)."""
