"""The per-service log ring: bounded lines, tail, follow, line splitting, optional file."""

from __future__ import annotations

import asyncio

from machined.services import LogRing


class Chunks:
    """A ByteStream that returns the given chunks, then EOF."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    async def read(self, n: int = -1) -> bytes:
        await asyncio.sleep(0)
        return self.chunks.pop(0) if self.chunks else b""


def test_ring_keeps_the_last_lines_and_tails():
    ring = LogRing(3)
    for i in range(5):
        ring.append(f"line {i}")
    assert [ln.text for ln in ring.tail()] == ["line 2", "line 3", "line 4"]
    assert [ln.text for ln in ring.tail(2)] == ["line 3", "line 4"]
    assert ring.tail(0) == []
    assert [ln.seq for ln in ring.tail(-1)] == [3, 4, 5]


async def test_pump_splits_lines_across_chunks_and_keeps_the_unterminated_tail():
    ring = LogRing(100, max_line_bytes=8)
    await ring.pump(Chunks(b"hel", b"lo\nwor", b"ld\r\n", b"0123456789abcdefXY", b"\nlast"), "stderr")
    assert [ln.text for ln in ring.tail()] == ["hello", "world", "01234567", "89abcdef", "XY", "last"]
    assert {ln.stream for ln in ring.tail()} == {"stderr"}


async def test_pump_replaces_invalid_utf8():
    ring = LogRing(10)
    await ring.pump(Chunks(b"caf\xe9\n"))
    assert ring.tail()[0].text == "caf\ufffd"


async def test_follow_gives_the_tail_then_new_lines_until_closed():
    ring = LogRing(10)
    ring.append("old 1")
    ring.append("old 2")
    got: list[str] = []

    async def reader() -> None:
        async for line in ring.follow(tail=1):
            got.append(line.text)

    task = asyncio.create_task(reader())
    await asyncio.sleep(0)
    ring.append("new 1")
    await asyncio.sleep(0)
    ring.append("new 2")
    ring.append("new 3")
    await asyncio.sleep(0)
    ring.close()
    async with asyncio.timeout(2):
        await task
    assert got == ["old 2", "new 1", "new 2", "new 3"]


async def test_a_follower_that_falls_behind_skips_what_the_ring_lost():
    ring = LogRing(3)
    it = ring.follow(tail=0)
    first = asyncio.ensure_future(it.__anext__())
    await asyncio.sleep(0)
    ring.append("a")
    assert (await first).text == "a"
    for i in range(10):
        ring.append(f"b{i}")  # the follower is not reading
    ring.close()
    rest = [ln async for ln in it]
    assert [ln.text for ln in rest] == ["b7", "b8", "b9"]
    assert rest[0].seq == 9  # the gap in seq shows 7 lines were lost


async def test_lines_are_also_appended_to_the_file(tmp_path):
    path = tmp_path / "logs" / "svc.log"
    ring = LogRing(2, path=path)
    for i in range(4):
        ring.append(f"l{i}")
    ring.close()
    assert path.read_text() == "l0\nl1\nl2\nl3\n"  # the file keeps everything, the ring the last 2
    assert len(ring) == 2


async def test_an_unwritable_file_does_not_break_the_ring(tmp_path):
    (tmp_path / "f").write_text("")
    ring = LogRing(5, path=tmp_path / "f" / "svc.log")  # parent is a file
    ring.append("still here")
    assert [ln.text for ln in ring.tail()] == ["still here"]
