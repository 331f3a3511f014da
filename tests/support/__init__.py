"""Test support: real servers (nginx, tinyproxy), block devices, tool lookup, the CLI runner.

``cli`` runs the real ``imagestream`` command and reads its output; ``targets`` reads back what
a stream left on a file or device; ``process`` is the server-process base nginx and tinyproxy
share.
"""
