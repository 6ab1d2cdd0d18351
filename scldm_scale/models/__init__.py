"""Autoencoder, latent diffusion transformer, interpolant and samplers."""
