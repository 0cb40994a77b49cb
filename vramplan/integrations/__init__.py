"""Integrations with training stacks; each module imports its stack (transformers, ...) and is
imported only by users who have it."""
