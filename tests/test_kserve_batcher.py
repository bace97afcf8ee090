"""The KServe-native predictor's micro-batcher, alone (no server, no model store).

Concurrent submissions must share calls of the batch function, up to ``max_batch`` per
call, and each caller must get the answer its own item would get alone; a batch that
fails as a whole is retried item by item so one bad item fails only itself.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

from cxrserve.core.errors import CXRInputError, UnsupportedFormat
from cxrserve.tools.kserve.batcher import MicroBatcher


class Scorer:
    """A batch function that answers each item alone and records the batches it was given."""

    def __init__(self, fail_on=None):
        self.batches: list[list] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, items: list) -> list:
        with self.lock:
            self.batches.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("this batch holds the item that breaks the model")
        return [UnsupportedFormat("not an image") if item == "bad" else {"item": item, "score": item * 0.5}
                for item in items]


def run(batcher: MicroBatcher, items: list) -> list:
    async def main():
        return await asyncio.gather(*(batcher.submit(item) for item in items), return_exceptions=True)

    return asyncio.run(main())


def test_concurrent_requests_share_calls_and_get_their_own_answers():
    scorer, sizes = Scorer(), []
    batcher = MicroBatcher(scorer, max_batch=4, max_delay_s=0.5, on_batch=sizes.append)
    got = run(batcher, list(range(10)))
    assert got == [Scorer()([i])[0] for i in range(10)]  # each equals its single-request answer
    assert sizes == [len(b) for b in scorer.batches] == [4, 4, 2], scorer.batches
    print(f"\n10 concurrent requests, max_batch 4: {len(scorer.batches)} calls of {sizes}")


def test_a_lone_request_waits_at_most_the_delay():
    scorer = Scorer()
    batcher = MicroBatcher(scorer, max_batch=8, max_delay_s=0.05)

    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        answer = await batcher.submit(3)
        return answer, loop.time() - start

    answer, seconds = asyncio.run(main())
    assert answer == {"item": 3, "score": 1.5} and scorer.batches == [[3]]
    assert seconds < 5  # closed by its delay, not held for a batch that never fills


def test_an_input_error_is_its_own_answer_and_a_failing_batch_is_retried_alone():
    scorer = Scorer(fail_on=13)
    batcher = MicroBatcher(scorer, max_batch=8, max_delay_s=0.5)
    got = run(batcher, [11, "bad", 13, 14])
    assert got[0] == {"item": 11, "score": 5.5} and got[3] == {"item": 14, "score": 7.0}
    assert isinstance(got[1], CXRInputError) and got[1].status == 415  # answered, not raised
    assert isinstance(got[2], RuntimeError)  # only the item that breaks the model fails
    assert scorer.batches == [[11, "bad", 13, 14], [11], ["bad"], [13], [14]]


@pytest.mark.parametrize("max_batch", [1, 0])
def test_max_batch_one_calls_once_per_request(max_batch):
    scorer = Scorer()
    run(MicroBatcher(scorer, max_batch=max_batch, max_delay_s=0.5), [1, 2, 3])
    assert scorer.batches == [[1], [2], [3]]
