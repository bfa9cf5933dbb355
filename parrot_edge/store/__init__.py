"""The model store: manifests, the GGUF header check, the catalog and the installed models."""
