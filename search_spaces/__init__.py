"""Search spaces: one YAML file per loss family and the loader that validates them."""
