"""imagestream: stream compressed OS images onto disks, verified and resumable."""

__version__ = "0.1.0"
