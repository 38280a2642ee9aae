"""edge-router: the preview-URL edge router for sandbox platforms."""

__version__ = "0.1.0"
