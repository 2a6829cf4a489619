"""Greedy verification: the torch reference against a per-row loop of the rule, and the CUDA kernel
against the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

from effdecode.ops.backend import cuda_extension, warn_backend_fallback
from effdecode.ops.verify import verify_greedy, verify_greedy_reference

BIG_VOCAB = 151_936


def loop_verify(logits, input_ids, q_lens, finished, eos_token_ids):
    """The rule, one row at a time, straight from its statement."""
    batch, num_cols, _ = logits.shape
    eos = set(torch.as_tensor(eos_token_ids).tolist())
    num_emitted = torch.zeros(batch, dtype=torch.int32)
    emitted = torch.full((batch, num_cols), -1, dtype=torch.int64)
    finished_out = finished.clone().cpu()
    for b in range(batch):
        if bool(finished[b]):
            continue
        q = int(q_lens[b])
        start, num_drafts = num_cols - q, q - 1
        prediction = [int(torch.argmax(logits[b, start + j])) for j in range(q)]
        drafts = [int(input_ids[b, start + i]) for i in range(1, q)]  # drafts[i - 1] is draft i
        accepted = 0
        while accepted < num_drafts and drafts[accepted] == prediction[accepted]:
            accepted += 1
        tokens = drafts[:accepted] + [prediction[accepted]]
        for k, token in enumerate(tokens):
            if token in eos:
                tokens = tokens[: k + 1]
                finished_out[b] = True
                break
        num_emitted[b] = len(tokens)
        emitted[b, : len(tokens)] = torch.tensor(tokens)
    return num_emitted, emitted, finished_out


def planted_case(q_lens, num_cols, vocab, accepted, dtype=torch.float32, device="cpu"):
    """Random logits whose argmax at every column is a planted token, and drafts that match it for exactly
    ``accepted[b]`` drafts of row b (then one mismatch, unless all are accepted).

    Returns (logits, input_ids, q_lens, predictions), ``predictions[b, t]`` the argmax at column t.
    """
    batch = len(q_lens)
    # Distinct planted tokens (where the vocab allows), so an EOS id planted at one spot occurs nowhere else.
    if batch * num_cols <= vocab:
        predictions = torch.randperm(vocab)[: batch * num_cols].view(batch, num_cols)
    else:
        predictions = torch.randint(vocab, (batch, num_cols))
    logits = torch.randn(batch, num_cols, vocab)
    logits.scatter_(2, predictions[..., None], 8.0)  # well above the max of 151,936 normal samples
    input_ids = torch.randint(vocab, (batch, num_cols))
    for b, (q, a) in enumerate(zip(q_lens, accepted, strict=True)):
        start = num_cols - q
        assert 0 <= a <= q - 1
        for i in range(1, a + 1):
            input_ids[b, start + i] = predictions[b, start + i - 1]
        if a < q - 1:  # the first rejected draft differs from the prediction before it
            miss = start + a + 1
            input_ids[b, miss] = (predictions[b, miss - 1] + torch.randint(1, vocab, ())) % vocab
    logits = logits.to(dtype)
    assert torch.equal(logits.argmax(-1), predictions)
    q = torch.tensor(q_lens, dtype=torch.int32)
    return logits.to(device), input_ids.to(device), q.to(device), predictions.to(device)


def check_against_loop(logits, input_ids, q_lens, finished, eos):
    got = verify_greedy_reference(logits, input_ids, q_lens, finished, eos)
    want = loop_verify(logits, input_ids, q_lens, finished, eos)
    for g, w, name in zip(got, want, ("num_emitted", "emitted", "finished_out"), strict=True):
        assert g.dtype == w.dtype, name
        assert torch.equal(g.cpu(), w), f"{name}: got {g.tolist()}, want {w.tolist()}"
    num_emitted, emitted, finished_out = got
    # Invariants of the rule.
    assert (num_emitted <= q_lens).all()
    assert (num_emitted[finished] == 0).all() and finished_out[finished].all()
    assert (num_emitted[~finished] >= 1).all()
    cols = torch.arange(logits.shape[1])
    assert ((emitted == -1) == (cols >= num_emitted[:, None].long())).all()
    return got


def test_hand_example():
    # V = 10, T = 4. Argmax per column planted by hand.
    logits = torch.zeros(3, 4, 10)
    argmax = torch.tensor([[5, 1, 2, 3], [7, 4, 2, 9], [0, 6, 6, 8]])
    logits.scatter_(2, argmax[..., None], 1.0)
    input_ids = torch.tensor(
        [
            [9, 9, 1, 9],  # q=3: s=1; draft 1 (col 2) = 1 == pred at col 1 -> accepted; draft 2 = 9 != 2
            [0, 7, 4, 2],  # q=4: s=0; drafts 7, 4, 2 all accepted -> bonus 9 (an EOS)
            [3, 3, 3, 3],  # q=1: plain greedy
        ]
    )
    q_lens = torch.tensor([3, 4, 1], dtype=torch.int32)
    finished = torch.tensor([False, False, False])
    num_emitted, emitted, finished_out = check_against_loop(
        logits, input_ids, q_lens, finished, torch.tensor([9])
    )
    assert num_emitted.tolist() == [2, 4, 1]
    assert emitted.tolist() == [[1, 2, -1, -1], [7, 4, 2, 9], [8, -1, -1, -1]]
    assert finished_out.tolist() == [False, True, False]


@pytest.mark.parametrize("vocab", [1000, BIG_VOCAB])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_partial_acceptance(fresh_seed, vocab, dtype):
    num_cols = 6 if vocab == BIG_VOCAB else 9
    batch = 3 if vocab == BIG_VOCAB else 12
    q_lens = torch.randint(1, num_cols + 1, (batch,)).tolist()
    accepted = [int(torch.randint(0, q, ())) for q in q_lens]
    logits, input_ids, q, _ = planted_case(q_lens, num_cols, vocab, accepted, dtype)
    num_emitted, *_ = check_against_loop(
        logits, input_ids, q, torch.zeros(batch, dtype=torch.bool), torch.empty(0, dtype=torch.int64)
    )
    assert num_emitted.tolist() == [a + 1 for a in accepted]


def test_plain_greedy_and_no_drafts(fresh_seed):
    # T = 1 (plain greedy), and rows with d = 0 inside a wider verify batch.
    logits = torch.randn(5, 1, 1000)
    num_emitted, emitted, _ = check_against_loop(
        logits,
        torch.randint(1000, (5, 1)),
        torch.ones(5, dtype=torch.int32),
        torch.zeros(5, dtype=torch.bool),
        torch.tensor([3]),
    )
    assert num_emitted.tolist() == [1] * 5 and torch.equal(emitted[:, 0], logits[:, 0].argmax(-1))
    logits, input_ids, q, _ = planted_case([1, 1, 4], 4, 1000, [0, 0, 2])
    num_emitted, *_ = check_against_loop(logits, input_ids, q, torch.zeros(3, dtype=torch.bool), [])
    assert num_emitted.tolist() == [1, 1, 3]


def test_all_accepted_bonus(fresh_seed):
    q_lens = [5, 3, 5, 2]
    logits, input_ids, q, predictions = planted_case(q_lens, 5, 1000, [q - 1 for q in q_lens])
    num_emitted, emitted, finished_out = check_against_loop(
        logits, input_ids, q, torch.zeros(4, dtype=torch.bool), torch.empty(0, dtype=torch.int64)
    )
    assert num_emitted.tolist() == q_lens
    assert torch.equal(emitted[0], predictions[0])  # q = T: drafts 1..4 then the bonus at column 4
    assert not finished_out.any()


def test_repeated_token_all_accepted():
    # The target predicts 7 everywhere and every draft is 7: the bonus also equals the last draft, which
    # must not count as one more accepted draft (q tokens, not q + 1).
    logits = torch.zeros(2, 4, 50)
    logits[..., 7] = 1.0
    input_ids = torch.full((2, 4), 7)
    num_emitted, emitted, _ = check_against_loop(
        logits, input_ids, torch.tensor([4, 2], dtype=torch.int32), torch.zeros(2, dtype=torch.bool), []
    )
    assert num_emitted.tolist() == [4, 2]
    assert emitted.tolist() == [[7, 7, 7, 7], [7, 7, -1, -1]]


@pytest.mark.parametrize("vocab", [1000, BIG_VOCAB])
def test_eos_cut(fresh_seed, vocab):
    # Row 0: EOS is accepted draft 2 of 5. Row 1: EOS is the bonus. Row 2: EOS is a correction.
    # Row 3: EOS is the token after the first rejection (never emitted). Several EOS ids, one per row.
    num_cols = 6
    q_lens, accepted = [6, 4, 5, 5], [5, 3, 1, 1]
    logits, input_ids, q, predictions = planted_case(q_lens, num_cols, vocab, accepted)
    starts = [num_cols - x for x in q_lens]
    eos = torch.tensor(
        [
            predictions[0, starts[0] + 1],  # emitted token 2 = draft 2
            predictions[1, starts[1] + 3],  # the bonus
            predictions[2, starts[2] + 1],  # the correction after draft 1
            predictions[3, starts[3] + 3],  # beyond the emitted run
        ]
    )
    num_emitted, _, finished_out = check_against_loop(
        logits, input_ids, q, torch.zeros(4, dtype=torch.bool), eos
    )
    assert num_emitted.tolist() == [2, 4, 2, 2]
    assert finished_out.tolist() == [True, True, True, False]


def test_finished_rows_emit_nothing(fresh_seed):
    q_lens = [4, 4, 1, 3]
    logits, input_ids, q, predictions = planted_case(q_lens, 4, 1000, [3, 1, 0, 2])
    finished = torch.tensor([True, False, True, False])
    eos = predictions[0, 0:1]  # would cut row 0 if it were live
    num_emitted, emitted, finished_out = check_against_loop(logits, input_ids, q, finished, eos)
    assert num_emitted[finished].tolist() == [0, 0] and (emitted[finished] == -1).all()
    assert finished_out[finished].all()


@pytest.mark.parametrize("num_eos", [0, 1, 3])
def test_random_inputs(fresh_seed, num_eos):
    # Unplanted random logits and drafts (drafts nearly always rejected), plus argmax-copied prefixes and
    # heavy ties (integer logits in a small range) so the tie rule matters.
    batch, num_cols, vocab = 16, 7, 1000
    logits = torch.randint(-3, 3, (batch, num_cols, vocab)).float()
    logits[: batch // 2] = torch.randn(batch // 2, num_cols, vocab)
    input_ids = torch.randint(vocab, (batch, num_cols))
    prefix = torch.randint(0, num_cols, (batch,))
    shifted = torch.cat([input_ids[:, :1], logits.argmax(-1)[:, :-1]], dim=1)
    copy = torch.arange(num_cols)[None, :] <= prefix[:, None]
    input_ids = torch.where(copy, shifted, input_ids)
    q_lens = torch.randint(1, num_cols + 1, (batch,), dtype=torch.int32)
    finished = torch.rand(batch) < 0.2
    eos = torch.randint(vocab, (num_eos,))
    if num_eos:
        eos[0] = logits[0].argmax(-1)[-1]
    check_against_loop(logits, input_ids, q_lens, finished, eos)


def test_dispatch_on_cpu(fresh_seed):
    logits, input_ids, q, _ = planted_case([3, 2], 3, 1000, [1, 1])
    args = (logits, input_ids, q, torch.zeros(2, dtype=torch.bool), torch.tensor([5]))
    want = verify_greedy_reference(*args)
    for backend in ("auto", "torch", "triton"):
        got = verify_greedy(*args, backend=backend)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    # "cuda" cannot run on CPU tensors: the one backend rule (a warning naming it, then what runs instead).
    warn_backend_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="backend 'cuda' cannot run here"):
        got = verify_greedy(*args, backend="cuda")
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.gpu
@requires_cuda
class TestVerifyGreedyCuda:
    """The CUDA kernel against the torch reference on the same CUDA tensors."""

    @pytest.fixture(autouse=True)
    def _needs_extension(self):
        if cuda_extension() is None:
            pytest.skip("effdecode._C is not built")

    @staticmethod
    def _compare(logits, input_ids, q_lens, finished, eos):
        got = verify_greedy(logits, input_ids, q_lens, finished, eos, backend="cuda")
        want = verify_greedy_reference(logits, input_ids, q_lens, finished, eos)
        for g, w, name in zip(got, want, ("num_emitted", "emitted", "finished_out"), strict=True):
            assert g.dtype == w.dtype and g.device == w.device, name
            assert torch.equal(g, w), f"{name}: got {g.tolist()}, want {w.tolist()}"
        return got

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("vocab", [1000, 32_003, BIG_VOCAB])
    @pytest.mark.parametrize("num_cols", [1, 5, 16])
    def test_planted(self, fresh_seed, dtype, vocab, num_cols):
        batch = 6
        q_lens = torch.randint(1, num_cols + 1, (batch,)).tolist()
        accepted = [int(torch.randint(0, q, ())) for q in q_lens]
        accepted[0] = q_lens[0] - 1  # one row takes the bonus
        logits, input_ids, q, predictions = planted_case(q_lens, num_cols, vocab, accepted, dtype, "cuda")
        finished = torch.zeros(batch, dtype=torch.bool, device="cuda")
        finished[-1] = True
        eos = torch.stack([predictions[1, -1], predictions[2, num_cols - q_lens[2]]])
        self._compare(logits, input_ids, q, finished, eos)
        self._compare(logits, input_ids, q, finished, eos[:0])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_random_with_ties(self, fresh_seed, dtype):
        batch, num_cols, vocab = 64, 8, 5000
        logits = torch.randint(-2, 2, (batch, num_cols, vocab), device="cuda").to(dtype)
        # Drafts copy the argmax for a random prefix, so acceptance hinges on the tie rule.
        input_ids = torch.randint(vocab, (batch, num_cols), device="cuda")
        shifted = torch.cat([input_ids[:, :1], logits.argmax(-1)[:, :-1]], dim=1)
        prefix = torch.randint(0, num_cols, (batch, 1), device="cuda")
        input_ids = torch.where(torch.arange(num_cols, device="cuda") <= prefix, shifted, input_ids)
        q_lens = torch.randint(1, num_cols + 1, (batch,), dtype=torch.int32, device="cuda")
        finished = torch.rand(batch, device="cuda") < 0.1
        self._compare(logits, input_ids, q_lens, finished, torch.tensor([0, 1], device="cuda"))

    def test_tie_break_and_specials(self):
        vocab = 4099  # odd: exercises the unaligned head and tail paths
        logits = torch.zeros(5, 1, vocab, device="cuda")
        logits[0, 0, [7, 3000, 4098]] = 2.0  # ties -> 7
        logits[1, 0, [4098, 4000]] = 1.0  # ties in the tail region -> 4000
        logits[2] = -float("inf")  # all -inf -> 0
        logits[3, 0, [100, 50]] = float("nan")  # NaN beats everything; the first NaN -> 50
        logits[3, 0, 10] = float("inf")
        # Row 4 stays all zeros -> 0.
        ids = torch.zeros(5, 1, dtype=torch.int64, device="cuda")
        ones = torch.ones(5, dtype=torch.int32, device="cuda")
        no = torch.zeros(5, dtype=torch.bool, device="cuda")
        _, emitted, _ = self._compare(logits, ids, ones, no, torch.empty(0, dtype=torch.int64, device="cuda"))
        assert emitted[:, 0].tolist() == [7, 4000, 0, 50, 0]

    def test_repeated_token_all_accepted(self):
        logits = torch.zeros(3, 5, 1000, device="cuda", dtype=torch.float16)
        logits[..., 7] = 1.0
        input_ids = torch.full((3, 5), 7, device="cuda")
        q_lens = torch.tensor([5, 3, 1], dtype=torch.int32, device="cuda")
        no = torch.zeros(3, dtype=torch.bool, device="cuda")
        num_emitted, *_ = self._compare(logits, input_ids, q_lens, no, torch.tensor([9], device="cuda"))
        assert num_emitted.tolist() == [5, 3, 1]
        num_emitted, *_ = self._compare(logits, input_ids, q_lens, no, torch.tensor([9, 7], device="cuda"))
        assert num_emitted.tolist() == [1, 1, 1]

    def test_strided_inputs(self, fresh_seed):
        # Logits sliced out of a wider buffer (rows start off 16-byte boundaries) and strided input_ids.
        q_lens = [4, 2, 3]
        logits, input_ids, q, _ = planted_case(q_lens, 4, 1001, [3, 0, 1], torch.bfloat16, "cuda")
        wide = torch.randn(3, 6, 1003, device="cuda", dtype=torch.bfloat16)
        wide[:, 2:, 1:-1] = logits
        wide_ids = torch.randint(1001, (3, 8), device="cuda")
        wide_ids[:, 1::2] = input_ids
        finished = torch.zeros(3, dtype=torch.bool, device="cuda")
        self._compare(wide[:, 2:, 1:-1], wide_ids[:, 1::2], q, finished, torch.tensor([5], device="cuda"))

    def test_no_host_sync_and_graph_capture(self, fresh_seed):
        q_lens = [3, 1, 4]
        logits, input_ids, q, _ = planted_case(q_lens, 4, 1000, [1, 0, 3], torch.float16, "cuda")
        finished = torch.zeros(3, dtype=torch.bool, device="cuda")
        eos = torch.tensor([2], device="cuda")
        want = verify_greedy_reference(logits, input_ids, q, finished, eos)
        torch.cuda.set_sync_debug_mode("error")
        try:
            verify_greedy(logits, input_ids, q, finished, eos, backend="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            verify_greedy(logits, input_ids, q, finished, eos, backend="cuda")  # warm up off the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = verify_greedy(logits, input_ids, q, finished, eos, backend="cuda")
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(g, w) for g, w in zip(out, want, strict=True))

    def test_empty_batch(self):
        logits = torch.zeros(0, 3, 100, device="cuda")
        out = verify_greedy(
            logits,
            torch.zeros(0, 3, dtype=torch.int64, device="cuda"),
            torch.zeros(0, dtype=torch.int32, device="cuda"),
            torch.zeros(0, dtype=torch.bool, device="cuda"),
            [1],
            backend="cuda",
        )
        assert [tuple(t.shape) for t in out] == [(0,), (0, 3), (0,)]
