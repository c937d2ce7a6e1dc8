"""Runs the emulated API server on 127.0.0.1 in a background thread, and writes a kubeconfig for it."""

import asyncio
import threading

import kmock
import yaml
from kube_emulator import Emulator


class EmulatorThread:
    """Serves the emulator on 127.0.0.1 from its own thread and event loop: test code (and kopf,
    in its own process) can block as it likes without ever stalling the API server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "EmulatorThread":
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.emulator = Emulator()
        await self.emulator.__aenter__()
        self.server = kmock.Server(self.emulator)
        await self.server.__aenter__()
        self.url = f"http://127.0.0.1:{self.server.port}"

    async def _stop(self) -> None:
        try:  # open watch streams would hold the shutdown forever
            await asyncio.wait_for(self.server.__aexit__(None, None, None), 5)
        except TimeoutError:
            pass
        await self.emulator.__aexit__(None, None, None)

    def call(self, coro, timeout: float = 30):
        """Runs a coroutine on the emulator's loop (e.g. to inspect or seed state) and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def kubeconfig(self, path) -> str:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "emulator",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {"token": "emulator"}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {"cluster": "emulator", "user": "tester", "namespace": "default"},
                        }
                    ],
                }
            )
        )
        return str(path)
