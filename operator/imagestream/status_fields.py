"""The names of the progress fields, as `status.progress` of an ImageStream spells them.

The agent patches them into the status and the CLI's JSON lines repeat them, so a script reads
the same keys from `kubectl get ims -o json` and from `imagestream stream --progress json`.
"""

from __future__ import annotations

from imagestream.pipeline.progress import Progress


def progress_fields(progress: Progress) -> dict[str, object]:
    """The snapshot as camelCase fields, as the ImageStream status spells them."""
    fields: dict[str, object] = {
        "phase": progress.phase,
        "bytesFetched": progress.bytes_fetched,
        "bytesTotal": progress.bytes_total,
        "bytesWritten": progress.bytes_written,
        "bytesPerSecond": round(progress.bytes_per_second),
        "resumes": progress.resumes,
    }
    if progress.partitions is not None:
        # A COSI image: which partition image is being written, of how many.
        fields["partition"] = progress.partition
        fields["partitions"] = progress.partitions
    return fields
