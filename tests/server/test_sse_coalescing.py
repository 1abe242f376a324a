"""SSE writes: tokens already queued when the writer runs go out in one body write, the rest one by
one, and the stream's order, errors and closing [DONE] are unchanged.

The writer (`server.streaming._guarded`) and `RequestStream` are driven directly with real outputs;
the HTTP behaviour is covered by every streaming test over a real server (the byte stream is the
same whatever the write sizes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.engine import RequestStream
from server.errors import BadRequest
from server.sampling_params import SamplingParams
from server.sequence import RequestOutput, Sequence
from server.streaming import DONE_FRAME, _guarded


def _seq() -> Sequence:
    return Sequence("r", [1], SamplingParams(max_tokens=8), [1])


def _stream() -> RequestStream:
    return RequestStream("r", _seq())


async def _frames(stream: RequestStream) -> AsyncIterator[str]:
    async for out in stream:
        for tok in out.token_ids:
            yield f"data: {tok}\n\n"


async def _writes(stream: RequestStream, feed: list[list[RequestOutput]]) -> list[str]:
    """The body writes, with `feed[i]` put on the stream before the writer resumes for the i-th time."""
    closed = []
    gen = _guarded(_frames(stream), lambda: closed.append(True), stream.ready)
    writes = []
    for batch in feed:
        for out in batch:
            stream.put(out)
        writes.append(await gen.__anext__())
    async for rest in gen:
        writes.append(rest)
    assert closed == [True]
    return writes


def test_queued_outputs_go_out_in_one_write_and_the_rest_one_by_one() -> None:
    stream = _stream()
    outs = [RequestOutput("r", token_ids=[i]) for i in range(5)] + [RequestOutput("r", token_ids=[5], finished=True)]
    # three outputs queued before the writer runs, then one at a time, then the final one
    writes = asyncio.run(_writes(stream, [outs[:3], [outs[3]], [outs[4]], [outs[5]]]))
    assert writes[0] == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert writes[1:3] == ["data: 3\n\n", "data: 4\n\n"]
    assert writes[3:] == ["data: 5\n\n" + DONE_FRAME]  # the last frame and [DONE] in one write
    assert "".join(writes) == "".join(f"data: {i}\n\n" for i in range(6)) + DONE_FRAME


def test_a_final_output_is_not_waited_for_before_sending_what_came_before() -> None:
    """The final output may wait for its conversation's commit; the tokens before it go out first."""
    committed = asyncio.Event()

    async def run() -> list[str]:
        stream = RequestStream("r", _seq(), committed.wait)
        gen = _guarded(_frames(stream), lambda: None, stream.ready)
        stream.put(RequestOutput("r", token_ids=[7]))
        stream.put(RequestOutput("r", token_ids=[8], finished=True))
        first = await asyncio.wait_for(gen.__anext__(), 5)  # must not wait for the commit
        committed.set()
        return [first] + [w async for w in gen]

    writes = asyncio.run(run())
    assert writes == ["data: 7\n\n", "data: 8\n\n" + DONE_FRAME]


def test_an_error_after_queued_frames_keeps_them_and_ends_the_stream() -> None:
    async def frames() -> AsyncIterator[str]:
        yield "data: 1\n\n"
        raise BadRequest("boom")

    async def run() -> list[str]:
        return [w async for w in _guarded(frames(), lambda: None, lambda: True)]

    (write,) = asyncio.run(run())
    assert write.startswith("data: 1\n\nevent: error\n") and '"boom"' in write and write.endswith(DONE_FRAME)


def test_sse_response_ends_quietly_when_the_client_leaves_and_cleanly_when_done() -> None:
    """`SSEResponse` (no anyio task group): a disconnect while the stream waits cancels the stream
    where it waits (its cleanup runs: the engine abort) and raises nothing; a normal end leaves no
    cancellation pending on the request's task."""
    from server.streaming import SSEResponse

    async def run(disconnect: bool) -> tuple[list[bytes], list[bool]]:
        closed: list[bool] = []
        stall = asyncio.Event()  # never set: the stream waits on it after one frame

        async def frames() -> AsyncIterator[str]:
            yield "data: 1\n\n"
            if disconnect:
                await stall.wait()
            yield "data: 2\n\n"

        gone = asyncio.Event()

        async def receive() -> dict:
            await gone.wait()
            return {"type": "http.disconnect"}

        bodies: list[bytes] = []

        async def send(msg: dict) -> None:
            if msg["type"] == "http.response.body":
                bodies.append(msg["body"])
                if disconnect and msg["body"] == b"data: 1\n\n":
                    gone.set()

        response = SSEResponse(_guarded(frames(), lambda: closed.append(True)), media_type="text/event-stream")
        await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send), 5)
        await asyncio.sleep(0.01)  # a stray cancellation of this task would surface here
        return bodies, closed

    bodies, closed = asyncio.run(run(disconnect=True))
    assert bodies == [b"data: 1\n\n"] and closed == [True]
    bodies, closed = asyncio.run(run(disconnect=False))
    assert b"".join(bodies) == ("data: 1\n\ndata: 2\n\n" + DONE_FRAME).encode() and closed == [True]
