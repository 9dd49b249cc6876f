"""Loading models and wrapping them: adapters, loaders, the HookedModel."""
