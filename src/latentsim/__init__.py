"""latentsim: train and evaluate simulator LLMs that predict SAE latent activations from interpretations."""

__version__ = "0.1.0"
