"""The classroom engine: one llama.cpp context serving every student at once (see scheduler.py).

Kept import-light: the settings read the engine's limits from here, and the kiosk reads the settings.
"""
