"""What a TARGET means: the caller's words turned into a `TargetPlan` the pipeline executes.

The kind of target comes from the caller (the CLI argument's form, an ImageStream's
`spec.target.device` or `spec.target.extension`), never from what `stat` happens to find, so a
device that does not exist is `TargetNotFound` and never becomes a new file. One module per
kind (`device`, `file`, `ab`: the inactive volume of an A/B pair); `parse` is the entry that
picks one.
"""

from imagestream.pipeline.target_plan import TargetKind, TargetPlan
from imagestream.targets.parse import plan_target, target_from_argument
from imagestream.targets.request import TargetRequest

__all__ = ["TargetKind", "TargetPlan", "TargetRequest", "plan_target", "target_from_argument"]
