"""The KServe-native predictor's infer route in front of a stand-in model server, for
``test_kserve_limits.py``: ``python kserve_limits_server.py PORT LIMIT``.

A process of its own: the kserve SDK and tritonclient's gRPC stubs both define the
``inference`` protobuf package, so they cannot be imported into one test process.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace


class StandInDataplane:
    """Just enough of ``kserve``'s DataPlane for the route to reach its body handling."""

    async def model_ready(self, name, disable_predictor_health_check=False):
        return True


def main(port: int, limit: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    from cxrserve.tools.kserve.server import install_routes

    app = FastAPI()
    install_routes(app, SimpleNamespace(dataplane=StandInDataplane()), limit)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
