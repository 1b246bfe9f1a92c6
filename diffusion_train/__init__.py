"""diffusion_train: config-driven diffusion model training for scaling experiments."""

__version__ = "0.1.0"


MAX_DIRNAME_BYTES = 200  # file systems take 255 bytes per path component


def short_dirname(name: str) -> str:
    """``name`` as a directory name: unchanged up to ``MAX_DIRNAME_BYTES`` bytes, else its first 160 bytes and 12
    hex digits of its SHA-256, so that a sweep job with many overrides gets a run directory (the same one at each
    launch, so relaunching resumes) instead of a "file name too long" error."""
    import hashlib

    data = name.encode()
    if len(data) <= MAX_DIRNAME_BYTES:
        return name
    return f"{data[:160].decode(errors='ignore')}-{hashlib.sha256(data).hexdigest()[:12]}"


def _register_resolvers() -> None:
    """Config resolvers: ``${precomputed:PATH,KEY}`` reads ``data.KEY`` of a precomputed set's manifest;
    ``${short_dirname:NAME}`` (a sweep job's directory): :func:`short_dirname`."""
    from omegaconf import OmegaConf

    def precomputed(path: str, key: str):
        from diffusion_train.data.precomputed import manifest_value

        return manifest_value(path, key)

    for name, resolver in (("precomputed", precomputed), ("short_dirname", short_dirname)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


_register_resolvers()
