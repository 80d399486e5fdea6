"""Shared test helpers: real datasets, real weights, a real Redis (from bench.resources), loopback servers."""

from __future__ import annotations

import threading

from bench.resources import (BBC_CLASSES, BBC_NEWS, DATASETS, FLOWERS, HYMENOPTERA, LS_REQUESTS,  # noqa: F401
                             MOBILENET_V2_FILE, REPO, SHARED, RedisServer, dataset_images, dataset_texts,
                             free_port, install_offline_weights, offline_text_model)

CONFIG_2 = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
            '<Choice value="ants"/><Choice value="bees"/></Choices></View>')

class BackgroundServer:
    """Runs a loopback HTTP server (http.server or werkzeug's make_server) on a daemon thread."""

    def __init__(self, server):
        self.server = server
        self.port = server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
