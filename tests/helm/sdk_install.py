"""`helm install` through helm-sdkpy (Helm 4.3 as a library), run as its own process:
HELM_DRIVER=memory must be in the environment before the Go runtime starts (the emulator cannot hold
Helm's release Secrets), and one process per install keeps Go's global state out of pytest.

Usage: HELM_DRIVER=memory python sdk_install.py KUBECONFIG NAMESPACE RELEASE CHART VALUES_JSON
Prints the release as JSON.
"""

import asyncio
import json
import sys

import helm_sdkpy


def main(kubeconfig: str, namespace: str, release: str, chart: str, values: str) -> None:
    config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
    # No waiting: the emulator runs no controllers, so Deployments never become ready.
    result = asyncio.run(
        helm_sdkpy.Install(config).run(
            release, chart, values=json.loads(values), create_namespace=True, wait=False, timeout=60
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
