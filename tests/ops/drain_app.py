"""A tiny real app served by DrainingServer, run as a subprocess by test_drain.py.

Usage: python -m tests.ops.drain_app PORT FLUSH_FILE DEADLINE_S
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from server.drain import Drainer, DrainingServer, DrainMiddleware


def main() -> None:
    port, flush_file, deadline_s = int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    drainer = Drainer(deadline_s=deadline_s, flush_timeout_s=5)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/stream")
    async def stream(n: int = 10, interval: float = 0.1) -> StreamingResponse:
        async def chunks():
            for i in range(n):
                yield f"data: {i}\n\n"
                await asyncio.sleep(interval)
            yield "data: [DONE]\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def flush_async() -> None:
        await asyncio.sleep(0.05)
        with flush_file.open("a") as f:
            f.write(f"async flush, {drainer.in_flight} in flight\n")

    def flush_failing() -> None:
        raise ConnectionError("redis is down")

    def flush_sync() -> None:
        with flush_file.open("a") as f:
            f.write("sync flush\n")

    for callback in (flush_async, flush_failing, flush_sync):
        drainer.add_flush_callback(callback)
    app.add_middleware(DrainMiddleware, drainer=drainer)
    DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info"), drainer).run()


if __name__ == "__main__":
    main()
