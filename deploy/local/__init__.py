"""Local Kafka + Elasticsearch (+ Prometheus, Postgres + Kafka Connect/Debezium, Apicurio
Registry) for development, tests and the demo.

    from deploy.local import LocalStack

    stack = LocalStack(name="dev")        # state in ~/.cache/sparse-ingest/run/dev
    info = stack.up()                     # -> StackInfo(kafka_bootstrap=..., es_url=...)
    print(stack.status().describe())
    stack.down()

CLI: ``sparse-ingest stack fetch|up|down|status`` or ``python -m deploy.local ...``.
"""

from deploy.local.artifacts import FetchResult, fetch
from deploy.local.cdc import PostgresParams, debezium_postgres_config
from deploy.local.errors import (
    FetchError,
    JavaNotFoundError,
    MavenNotFoundError,
    PortInUseError,
    ServiceStartError,
    StackAlreadyRunningError,
    StackError,
)
from deploy.local.java import JavaInfo, find_java
from deploy.local.paths import cache_dir, default_run_dir
from deploy.local.probes import elasticsearch_ready, kafka_metadata, kafka_ready, prometheus_ready
from deploy.local.stack import LocalStack, ServiceStatus, StackInfo, StackStatus
from deploy.local.versions import (
    APICURIO_VERSION,
    CONNECT_VERSION,
    DEBEZIUM_VERSION,
    ELASTICSEARCH_VERSION,
    ELASTICSEARCH_VERSIONS,
    KAFKA_VERSION,
)

__all__ = [
    "APICURIO_VERSION",
    "CONNECT_VERSION",
    "DEBEZIUM_VERSION",
    "ELASTICSEARCH_VERSION",
    "ELASTICSEARCH_VERSIONS",
    "KAFKA_VERSION",
    "FetchError",
    "FetchResult",
    "JavaInfo",
    "JavaNotFoundError",
    "LocalStack",
    "MavenNotFoundError",
    "PortInUseError",
    "PostgresParams",
    "ServiceStartError",
    "ServiceStatus",
    "StackAlreadyRunningError",
    "StackError",
    "StackInfo",
    "StackStatus",
    "cache_dir",
    "debezium_postgres_config",
    "default_run_dir",
    "elasticsearch_ready",
    "fetch",
    "find_java",
    "kafka_metadata",
    "kafka_ready",
    "prometheus_ready",
]
