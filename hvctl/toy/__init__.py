"""The toy world: a synthetic universe whose truth is known (shared/design/toy-world.md)."""
