"""The classroom terminal chat. It talks to parrot-edge's HTTP API only: no llama.cpp, no torch."""
