"""Reports: pure functions from score arrays and result tables to metrics and figures (method
§5-6). Metrics: :mod:`detection`, :mod:`agreement`, :mod:`intervals`, :mod:`lds` (the
linear datamodeling score and its noise ceiling); figures: :mod:`score_plots`,
:mod:`instance_grids`, :mod:`prune_plots`, :mod:`training_plots` (and the LDS scatter in :mod:`lds`).
"""
