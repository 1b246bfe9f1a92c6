"""diffusion_train: config-driven diffusion model training for scaling experiments."""

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """Config resolvers: ``${precomputed:PATH,KEY}`` reads ``data.KEY`` of a precomputed set's manifest."""
    from omegaconf import OmegaConf

    def precomputed(path: str, key: str):
        from diffusion_train.data.precomputed import manifest_value

        return manifest_value(path, key)

    if not OmegaConf.has_resolver("precomputed"):
        OmegaConf.register_new_resolver("precomputed", precomputed)


_register_resolvers()
