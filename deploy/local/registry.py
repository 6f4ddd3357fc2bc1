"""The stack's optional schema registry: Apicurio Registry (in-memory storage).

``start`` runs the Quarkus runner jar of the fetched zip on a free port; ``ready_probe``
waits for its Confluent-compatible API (``GET /apis/ccompat/v7/subjects`` 200).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deploy.local import artifacts as fetching
from deploy.local import cdc
from deploy.local.procs import pick_port
from deploy.local.state import HOST, StackInfo, Wait
from deploy.local.versions import APICURIO_MIN_JAVA, APICURIO_VERSION

if TYPE_CHECKING:
    from deploy.local.runtime import StackRuntime


def ready_probe(entry: dict[str, Any]) -> Callable[[], bool]:
    url = entry["url"]
    return lambda: cdc.registry_ready(url, 3.0)


def start(stack: StackRuntime, info: StackInfo, state: dict[str, Any], taken: set[int]) -> Wait:
    """Start the registry (empty); fills ``info``'s registry fields."""
    java = stack._java(APICURIO_MIN_JAVA)
    port = pick_port(stack.registry_port, "Apicurio Registry", taken)
    rdir = stack.run_dir / "registry"
    shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir(parents=True)
    jar = fetching.registry_runner_jar(fetching.registry_home_dir(stack.cache))
    cmd = [str(java.java), "-Xmx256m", "-XX:+UseSerialGC", f"-Djava.io.tmpdir={rdir}"]
    cmd += [f"-Dquarkus.http.host={HOST}", f"-Dquarkus.http.port={port}", "-jar", str(jar)]
    url = f"http://{HOST}:{port}{cdc.REGISTRY_API}"
    log_file = rdir / "registry.log"
    stack.log(f"starting Apicurio Registry {APICURIO_VERSION} on {url} ...")
    stack._spawn(
        "registry",
        cmd,
        log_file,
        state,
        cwd=rdir,
        extra={"port": port, "url": url, "log": str(log_file), "version": APICURIO_VERSION},
    )
    info.registry_url = url
    info.registry_log = log_file
    info.versions["registry"] = APICURIO_VERSION
    return "registry", lambda: cdc.registry_ready(url, 3.0), log_file
