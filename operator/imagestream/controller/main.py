"""`imagestream controller`: configure the API client, kopf and the metrics port, then run.

kopf finds the API server through the same client library (in-cluster config in a Pod, else
`KUBECONFIG` or `~/.kube/config`), installs its own SIGTERM/SIGINT handlers and returns from
`kopf.run` once it has stopped watching, so a Deployment's rollout ends the process cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import kopf
from kubernetes import client

from imagestream.controller.builders import JobSettings
from imagestream.controller.kube import KubeClient, load_configuration
from imagestream.controller.metrics import Metrics, serve
from imagestream.errors import ImageStreamError

log = logging.getLogger(__name__)

FINALIZER = "imagestream.dev/cleanup"
#: kopf's handler bookkeeping lives in annotations under this prefix, never in `.status`
#: (the CRD's status schema has no room for it, and users read status).
ANNOTATION_PREFIX = "imagestream.dev"
#: A watch request ends after this long and is renewed: a restarted API server is noticed soon.
#: An int: kopf sends it as `timeoutSeconds=str(value)`, and the API server parses that with
#: strconv.ParseInt, so `60.0` is 400 BadRequest and no watch would ever start.
WATCH_SERVER_TIMEOUT = 60
#: The client gives up on a watch a little after the server should have closed it.
WATCH_CLIENT_TIMEOUT = 75.0
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0


def operator_settings() -> kopf.OperatorSettings:
    """kopf's settings for this controller."""
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Only the Events the handlers post on purpose, and kopf's warnings/errors.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "imagestream-controller"
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT
    settings.watching.connect_timeout = CONNECT_TIMEOUT
    settings.networking.connect_timeout = CONNECT_TIMEOUT
    settings.networking.request_timeout = REQUEST_TIMEOUT
    return settings


def job_settings(args: argparse.Namespace) -> JobSettings:
    """The agent Job options of the command line."""
    return JobSettings(
        agent_image=args.agent_image,
        service_account=args.agent_service_account,
        ttl_seconds_after_finished=args.job_ttl_seconds,
        image_pull_policy=args.agent_image_pull_policy,
        extra_env=tuple(args.agent_env),
    )


def liveness_endpoint(args: argparse.Namespace) -> str | None:
    """kopf's liveness URL for --health-port (None: not served).

    kopf answers it only while its event loop runs, so a wedged controller fails the probe.
    """
    if not args.health_port:
        return None
    return f"http://{args.metrics_address}:{args.health_port}/healthz"


class JsonFormatter(logging.Formatter):
    """One JSON object a line (time, level, logger, message, and the traceback if any), for log
    pipelines that parse rather than grep."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(verbose: bool, log_format: str = "text") -> None:
    """Timestamped lines on stderr, as a container's log wants them: plain text, or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True
    )
    # kopf logs every timer run at INFO: once a second per stream is noise unless asked for.
    logging.getLogger("kopf.objects").setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)


def controller_command(args: argparse.Namespace) -> int:
    """Run the controller until SIGTERM/SIGINT; 0 on a clean stop, 1 when it cannot start."""
    configure_logging(bool(getattr(args, "verbose", False)), args.log_format)
    try:
        configuration = load_configuration()
    except ImageStreamError as exc:
        log.error("%s", exc.message)
        return 1
    # Imported here: registering the handlers needs nothing before, but must happen once.
    from imagestream.controller.handlers import Runtime  # noqa: PLC0415

    metrics = Metrics()
    runtime = Runtime(
        settings=job_settings(args),
        kube=KubeClient(client.ApiClient(configuration)),
        metrics=metrics,
    )
    try:
        serve(args.metrics_port, args.metrics_address)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%s: %s", args.metrics_address, args.metrics_port, exc)
        return 1
    namespaces = list(args.namespace)
    log.info("watching %s", "all namespaces" if args.all_namespaces else ", ".join(namespaces))
    kopf.run(
        settings=operator_settings(),
        standalone=bool(args.standalone),
        clusterwide=bool(args.all_namespaces),
        namespaces=namespaces,
        memo=kopf.Memo(runtime=runtime),
        liveness_endpoint=liveness_endpoint(args),
    )
    return 0
