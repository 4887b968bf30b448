"""grootfs-py: a container image plugin for Garden-runC."""

__version__ = "0.1.0"
