"""The stride predictor behind the read-ahead of Dask chunks of remote files."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siff_xarray.reader.readahead import StridePredictor

N = 1000  # frames in the file
STRIDE = 14  # frames from one chunk to the next (two volumes of 6 planes + a flyback)
#: a chunk's frames: two volumes of six planes, without the flyback frame of each
PATTERN = np.array([v * 7 + p for v in range(2) for p in range(6)], dtype=np.int64)


def chunk(k: int) -> np.ndarray:
    return PATTERN + k * STRIDE


def firsts(reads: list[np.ndarray]) -> list[int]:
    return [int(g[0]) for g in reads]


@pytest.mark.parametrize("step", [1, -1])
def test_a_run_of_chunks_predicts_once_three_confirm_the_stride(step):
    p = StridePredictor(depth=4)
    order = list(range(10, 30)) if step == 1 else list(range(30, 10, -1))
    got = [firsts(p.after(chunk(k), N)) for k in order]
    assert got[0] == got[1] == []  # two reads: no stride known yet
    k = order[2]

    def at(*js):
        return [(k + j * step) * STRIDE for j in js]

    # confirmed: one read ahead; each predicted read doubles the window, up to depth
    assert got[2:6] == [at(1), at(2, 3), at(4, 5, 6), at(7)]
    # from then on each read predicts the one `depth` ahead of it
    for i, g in enumerate(got[6:], start=4):
        assert g == at(i + 4)


def test_predictions_keep_the_reads_pattern_and_stop_at_the_file_end():
    p = StridePredictor(depth=4)
    for k in (67, 68):
        assert p.after(chunk(k), N) == []
    got = p.after(chunk(69), N)
    assert len(got) == 1
    np.testing.assert_array_equal(got[0], chunk(70))
    got = p.after(chunk(70), N)  # chunk 71 is cut at frame 999; 72 is past the end
    assert len(got) == 1
    np.testing.assert_array_equal(got[0], chunk(71)[:6])
    assert p.after(chunk(71)[:6], N) == []  # nothing after the last one left to predict


def test_two_threads_interleaving_their_chunks_still_confirm_the_stride():
    p = StridePredictor(depth=4)
    # Dask's two threads start chunks 20 and 19, then 18 and 17 in either order
    assert p.after(chunk(20), N) == p.after(chunk(19), N) == []
    assert p.after(chunk(17), N) == []  # 19 - 17: a stride of -2 chunks, not confirmed
    assert p.after(chunk(18), N) == []  # 20, 19, 18 confirm -1; 17 was read already
    assert firsts(p.after(chunk(16), N)) == [15 * STRIDE]  # 18, 17, 16
    assert firsts(p.after(chunk(15), N)) == [14 * STRIDE, 13 * STRIDE]


def test_a_run_that_breaks_early_leaves_few_predictions_unread():
    """As where a cluster spreads a run's chunks over workers: the window starts at one,
    and of the reads elsewhere only the first predicts (two reads, resuming the stride)."""
    p = StridePredictor(depth=4)
    for k in (10, 11):
        assert p.after(chunk(k), N) == []
    assert firsts(p.after(chunk(12), N)) == [13 * STRIDE]
    assert firsts(p.after(chunk(40), N)) == [41 * STRIDE, 42 * STRIDE]  # resumed once
    for k in (25, 33, 7, 19):  # the run went on elsewhere
        assert p.after(chunk(k), N) == []


def test_the_first_read_after_a_jump_resumes_the_last_runs_stride():
    """Dask's order: a run down to chunk 0, then another down from chunk 60."""
    p = StridePredictor(depth=4)
    for k in range(10, -1, -1):
        p.after(chunk(k), N)
    assert firsts(p.after(chunk(60), N)) == [59 * STRIDE, 58 * STRIDE]
    # one of them read: the run is confirmed, and its window grows from two
    assert firsts(p.after(chunk(59), N)) == [57 * STRIDE, 56 * STRIDE, 55 * STRIDE]
    assert firsts(p.after(chunk(58), N)) == [54 * STRIDE]
    # and the next jump resumes again (chunks 49 to 46 are predicted and wait)
    for k in range(57, 49, -1):
        p.after(chunk(k), N)
    assert firsts(p.after(chunk(30), N)) == [29 * STRIDE, 28 * STRIDE]
    # without a run before, a jump's reads wait for three of the new run
    q = StridePredictor(depth=4)
    assert q.after(chunk(60), N) == q.after(chunk(59), N) == []


def test_a_resumed_stride_is_used_once_and_only_within_its_pass():
    p = StridePredictor(depth=4)
    for k in (10, 11, 12, 13):
        p.after(chunk(k), N)
    assert len(p.after(chunk(30), N)) == 2  # resumed: 31 and 32
    assert p.after(chunk(5), N) == []  # neither was read: no second resume
    # a new pass (chunk 10 read again) forgets the strides of the last one
    r = StridePredictor(depth=4)
    for k in (10, 11, 12, 13):
        r.after(chunk(k), N)
    assert r.after(chunk(10), N) == [] and r.after(chunk(30), N) == []


def test_reads_in_no_order_or_of_other_shapes_predict_nothing():
    p = StridePredictor(depth=4)
    for k in (5, 40, 12, 33, 7, 21, 2):
        assert p.after(chunk(k), N) == []
    # a constant stride, but each read a different shape (no chunk grid)
    q = StridePredictor(depth=4)
    for n in (3, 4, 5, 6):
        assert q.after(np.arange(n * 10, n * 10 + n), N) == []
    assert StridePredictor(depth=4).after(np.array([5]), N) == []  # one frame: no pattern


@settings(max_examples=200, deadline=None)
@given(order=st.permutations(list(range(40))), depth=st.integers(1, 5),
       again=st.booleans())
def test_predictions_never_repeat_a_waiting_read_or_one_of_this_pass(order, depth, again):
    """In any order of reads, a chunk is fetched at most once per pass (read or
    predicted), and at most ``2 * depth`` predictions wait unread."""
    p = StridePredictor(depth=depth)
    waiting: set[int] = set()
    this_pass: set[int] = set()
    fetched: list[int] = []
    for k in order + (sorted(order) if again else []):
        if k in this_pass:  # read again: a new pass
            this_pass.clear()
            fetched.clear()
        if k not in waiting:
            fetched.append(k)
        waiting.discard(k)
        this_pass.add(k)
        for g in p.after(chunk(k), 40 * STRIDE):
            j, r = divmod(int(g[0]), STRIDE)
            assert r == 0 and 0 <= j < 40
            np.testing.assert_array_equal(g, chunk(j))
            assert j not in waiting and j not in this_pass
            waiting.add(j)
            fetched.append(j)
        assert len(waiting) <= 2 * depth
        assert len(fetched) == len(set(fetched)), "a chunk was fetched twice in a pass"


def test_a_second_pass_over_the_chunks_is_predicted_again():
    p = StridePredictor(depth=2)
    for _ in range(2):
        got = [firsts(p.after(chunk(k), N)) for k in range(20)]
        assert sum(map(len, got)) >= 20 - 3
    assert got[3] == [4 * STRIDE, 5 * STRIDE]


@settings(max_examples=100, deadline=None)
@given(start=st.integers(0, 30), stop=st.integers(0, 30), depth=st.integers(1, 5))
def test_a_run_that_stops_leaves_at_most_depth_predictions_unread(start, stop, depth):
    p = StridePredictor(depth=depth)
    step = 1 if stop >= start else -1
    read, predicted = set(), set()
    for k in range(start, stop + step, step):
        read.add(k)
        predicted.update(int(g[0]) // STRIDE for g in p.after(chunk(k), 40 * STRIDE))
    assert len(predicted - read) <= depth


def test_the_predictor_is_safe_from_several_threads():
    p = StridePredictor(depth=3, memory=64)
    out: list[int] = []
    lock = threading.Lock()

    def reader(ks):
        for k in ks:
            got = firsts(p.after(chunk(k), N))
            with lock:
                out.extend(got)

    threads = [threading.Thread(target=reader, args=(range(i, 60, 4),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == len(set(out))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="depth"):
        StridePredictor(depth=0)
