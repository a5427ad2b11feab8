"""The meta-learners as pure functions of ``(lam, task)``: MAML, ANIL, iMAML (method §1)."""
