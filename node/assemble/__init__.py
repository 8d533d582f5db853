"""Assemble and route: decide when a study is complete and which pipeline takes it."""
