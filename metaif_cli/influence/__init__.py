"""Influence of training units: the bilevel problem, total Hessian products, iHVP solvers and
the scores (method §2-4)."""
