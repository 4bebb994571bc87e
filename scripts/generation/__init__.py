"""CPGG generation: phenotype VAE, cine autoencoder, latent cache, MAR with its diffusion head, sampling, benchmark."""
