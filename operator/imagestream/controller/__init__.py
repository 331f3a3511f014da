"""The ImageStream controller: thin kopf handlers over pure decisions and builders (DESIGN §3).

`spec` parses a resource, `builders` makes the agent Job and the status conditions,
`decisions` turns one observation into a status patch and actions, `kube` is the only module
that talks to the API, `handlers` wires them to kopf, `metrics` exports Prometheus series and
`main` runs it all as `imagestream controller`.
"""
