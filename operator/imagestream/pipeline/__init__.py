"""The data path: source -> SHA-384 -> decompress -> sink. Knows nothing of Kubernetes."""
