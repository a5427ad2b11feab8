"""Influence of training units: the bilevel problem, total Hessian products, iHVP solvers and
the scores (SPEC sections 2-4)."""
