"""Deployment: the offline install bundle, the CPU probe, the doctor and the checks before serving."""
