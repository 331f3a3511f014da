"""`imagestream serve`: the gRPC disk-streaming service, wire-compatible with Trident's v1 API.

`wire` turns our outcomes into Trident's messages (pure), `disks` picks the disk, `servicing`
runs one StreamDisk at a time through the targets layer and the pipeline, `server` listens
(0600 Unix socket or mutual-TLS TCP) and `client` is `imagestream stream-disk`.
"""
