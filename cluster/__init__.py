"""Deployment: the driver that places the actors, the CLI, `ray up` files."""
