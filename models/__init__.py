"""The model catalog: one JSON manifest per known model (see parrot_edge.manifest)."""
