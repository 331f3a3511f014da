"""Test support: real servers (nginx, tinyproxy), block devices and tool lookup for the tests."""
