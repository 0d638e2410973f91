"""Everything that runs inside a Ray Train worker: losses, the head, data, backbones, loops."""
