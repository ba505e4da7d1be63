"""Pictures of model outputs: slide heatmaps (:mod:`wsimil.viz.heatmap`) and evaluation plots
(:mod:`wsimil.viz.plots`)."""
