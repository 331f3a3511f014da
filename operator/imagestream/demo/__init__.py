"""Demo and test helpers: deterministic sample images and a fault-injecting range server."""
