"""The in-Pod runner: instructions from the Pod spec, the pipeline, status reporting."""
