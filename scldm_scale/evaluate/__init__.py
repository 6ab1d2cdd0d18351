"""Inference on real and generated cells; reads model artifacts (`scldm_scale.artifact`), never `train/`.

- `run.py`: `scldm-scale evaluate`, real vs generated (and training) cells -> metrics.json, report.md, figures;
  `suite.py` computes every metric per condition beside the baselines of `baselines.py` (noise floor,
  independent NB, scVI) and `perturbation.py` (additive shift for unseen combinations), over the groups of
  `conditions.py`; `metrics.py` holds the metrics, `report.py` and `plots.py` the tables and figures.
- `embed.py`: `scldm-scale embed` and `embed_cells`, a VAE's posterior-mean latents of cells streamed from an
  .h5ad, a SOMA experiment or an in-memory AnnData; `reconstruction.py`: the VAE's reconstruction metrics.
- `classify.py`: `scldm-scale classify`, cell-type classifiers on the latents vs PCA.
"""
