"""The pure-torch models: the set VAE (mcab.py blocks, vae.py, likelihoods.py), the DiT prior and its
flow-matching objective (dit.py, prior.py), the interpolant and samplers (transport.py, sampling.py), and the
library-size model. Each model reports its own cost (its transformer blocks, forward FLOPs and saved
activations per cell, counted as cost.py says), which train/ and plan.py only sum."""
