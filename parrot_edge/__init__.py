"""parrot-edge: the offline AI runtime for Synapta OS.

Kept import-light on purpose: the kiosk and `parrot-edge --help` must not pull in llama.cpp or torch.
"""

__version__ = "0.1.0"
