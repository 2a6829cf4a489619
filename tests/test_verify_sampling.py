"""Speculative-sampling verification: the torch reference against a per-row loop of the rule, the Triton
kernel against the reference (bit-exact with shared random numbers), the lossless-ness of both in
distribution, and the Triton greedy verify kernel against the greedy reference. On CPU Triton runs in its
interpreter."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from test_verify import BIG_VOCAB, planted_case

from effdecode.kernels.verify import verify_greedy_triton, verify_sampling_triton
from effdecode.ops.verify import (
    philox_offset_increment,
    verify_greedy,
    verify_greedy_reference,
    verify_sampling,
    verify_sampling_reference,
)

NAMES = ("num_emitted", "emitted", "finished_out")


# ------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------


def race(r: torch.Tensor, e: torch.Tensor) -> int:
    """The exponential race over one distribution, as the rule states it."""
    return int(torch.where(r > 0, r / e, -1.0).argmax())


def loop_verify_sampling(target, draft, input_ids, q_lens, finished, eos_token_ids, uniforms, exponentials):
    """The rule, one row and one draft at a time, straight from its statement."""
    batch, num_cols, vocab = target.shape
    eos = set(torch.as_tensor(eos_token_ids).tolist())
    num_emitted = torch.zeros(batch, dtype=torch.int32)
    emitted = torch.full((batch, num_cols), -1, dtype=torch.int64)
    finished_out = finished.clone()
    for b in range(batch):
        q = min(max(int(q_lens[b]), 0), num_cols)
        if bool(finished[b]) or q == 0:
            continue
        start = num_cols - q
        tokens, final = [], None
        for i in range(1, q):
            x, col = int(input_ids[b, start + i]), start + i - 1
            q_x = draft[b, col, x] if draft is not None else torch.tensor(1.0)
            if uniforms[b, col] * q_x < target[b, col, x]:  # the fp32 product, as the rule states it
                tokens.append(x)
                continue
            q_col = (
                draft[b, col] if draft is not None else torch.nn.functional.one_hot(torch.tensor(x), vocab)
            )
            r = (target[b, col] - q_col).clamp(min=0)
            final = race(r if bool((r > 0).any()) else target[b, col], exponentials[b, col])
            break
        if final is None:
            final = race(target[b, num_cols - 1], exponentials[b, num_cols - 1])
        tokens.append(final)
        for k, token in enumerate(tokens):
            if token in eos:
                tokens = tokens[: k + 1]
                finished_out[b] = True
                break
        num_emitted[b] = len(tokens)
        emitted[b, : len(tokens)] = torch.tensor(tokens)
    return num_emitted, emitted, finished_out


def assert_same(got, want):
    for g, w, name in zip(got, want, NAMES, strict=True):
        assert g.dtype == w.dtype and g.device == w.device, name
        assert torch.equal(g, w), f"{name}: got {g.tolist()}, want {w.tolist()}"


def check_invariants(out, input_ids, q_lens, finished, eos_token_ids):
    """What any correct verification obeys, whatever the random numbers."""
    num_emitted, emitted, finished_out = (t.cpu() for t in out)
    input_ids, q_lens, finished = input_ids.cpu(), q_lens.cpu().long(), finished.cpu()
    eos = torch.as_tensor(eos_token_ids).cpu()
    num_cols = emitted.shape[1]
    n = num_emitted.long()
    assert (n <= q_lens).all() and (n >= 0).all()
    assert (n[finished] == 0).all() and finished_out[finished].all()
    assert (n[~finished & (q_lens > 0)] >= 1).all()
    cols = torch.arange(num_cols)
    assert ((emitted == -1) == (cols >= n[:, None])).all()  # nothing after the run
    for b in range(len(n)):
        k, start = int(n[b]), num_cols - int(q_lens[b])
        if k == 0:
            continue
        # Every token but the last is an accepted draft, in order (accepted <= number of drafts).
        assert emitted[b, : k - 1].tolist() == input_ids[b, start + 1 : start + k].tolist()
        # EOS only ever ends a run, and a row finishes exactly when its run holds one.
        run_eos = torch.isin(emitted[b, :k], eos)
        assert not run_eos[:-1].any()
        assert bool(finished_out[b]) == bool(run_eos[-1])


def random_case(batch, num_cols, vocab, *, ngram, num_eos=2, device="cpu"):
    """Random target/draft distributions with drafts sampled from them, ragged q_lens (one full row and one
    with no draft), a few finished rows, explicit random numbers and EOS ids that do occur.

    Returns (target, draft or None, input_ids, q_lens, finished, eos, uniforms, exponentials).
    """
    logits = torch.randn(batch, num_cols, vocab) * 2
    # A sharp peak in half the columns, so that acceptances (n-gram drafts copy the peak) are frequent.
    peaks = torch.randint(vocab, (batch, num_cols))
    logits.scatter_add_(2, peaks[..., None], 8.0 * (torch.rand(batch, num_cols, 1) < 0.5))
    target = logits.softmax(-1)
    draft = (logits + torch.randn(batch, num_cols, vocab)).softmax(-1)  # close to the target
    if ngram:
        guesses = torch.where(
            torch.rand(batch, num_cols) < 0.7, peaks, torch.randint(vocab, (batch, num_cols))
        )
    else:
        guesses = torch.multinomial(draft.view(-1, vocab), 1).view(batch, num_cols)
    input_ids = torch.randint(vocab, (batch, num_cols))
    input_ids[:, 1:] = guesses[:, :-1]  # draft at column c + 1 comes from the distribution at column c
    q_lens = torch.randint(1, num_cols + 1, (batch,), dtype=torch.int32)
    q_lens[0], q_lens[1] = num_cols, 1
    finished = torch.rand(batch) < 0.2
    finished[:2] = False
    eos = torch.randint(vocab, (num_eos,))
    if num_eos:
        eos[0] = input_ids[0, 2 if num_cols > 2 else 0]  # a draft that is often accepted
    uniforms = torch.rand(batch, num_cols)
    exponentials = torch.empty(batch, num_cols, vocab).exponential_()
    tensors = (target, None if ngram else draft, input_ids, q_lens, finished, eos, uniforms, exponentials)
    return tuple(t.to(device) if t is not None else None for t in tensors)


def run_triton(target, draft, input_ids, q_lens, finished, eos, uniforms, exponentials, **kwargs):
    """The kernel with explicit random numbers (``kwargs``: its tuning knobs)."""
    eos = torch.as_tensor(eos, dtype=torch.int64, device=target.device)
    return verify_sampling_triton(
        target, draft, input_ids, q_lens, finished, eos, None, None, uniforms, exponentials, **kwargs
    )


# ------------------------------------------------------------------------------------------------------------
# Exact: reference vs loop, Triton vs reference
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ngram", [False, True])
def test_reference_matches_loop(fresh_seed, ngram):
    case = random_case(24, 6, 64, ngram=ngram)
    got = verify_sampling_reference(*case)
    assert_same(got, loop_verify_sampling(*case))
    target, draft, input_ids, q_lens, finished, eos, *_ = case
    check_invariants(got, input_ids, q_lens, finished, eos)
    # The case must exercise what it is meant to: rejections, full acceptance, EOS.
    accepted = got[0].long() - 1
    live = ~finished & ~got[2]
    assert (accepted[live] < q_lens[live] - 1).any() and (accepted[live] == q_lens[live] - 1).any()


@pytest.mark.parametrize("chunks", [None, 4], ids=["one_chunk", "split"])
@pytest.mark.parametrize("ngram", [False, True])
def test_triton_matches_reference(fresh_seed, ngram, chunks):
    case = random_case(16, 7, 1000, ngram=ngram, num_eos=3)
    want = verify_sampling_reference(*case)
    # block_v=128 gives chunks of 256 entries, so "split" really takes the two-kernel path.
    got = run_triton(*case, num_chunks=chunks, block_v=128 if chunks else None)
    assert_same(got, want)
    check_invariants(got, case[2], case[3], case[4], case[5])


@pytest.mark.parametrize("ngram", [False, True])
def test_triton_big_vocab(fresh_seed, ngram):
    case = random_case(3, 4, BIG_VOCAB, ngram=ngram)
    want = verify_sampling_reference(*case)
    assert_same(run_triton(*case), want)
    if not ngram:
        assert_same(run_triton(*case, num_chunks=5), want)


def test_no_eos_and_one_column(fresh_seed):
    # T = 1 is plain sampling: one bonus token per live row, drawn from the only column.
    case = random_case(6, 1, 300, ngram=False, num_eos=0)
    target, _, _, _, finished, _, _, exponentials = case
    want = verify_sampling_reference(*case)
    assert_same(run_triton(*case), want)
    for b in range(6):
        expected = -1 if finished[b] else race(target[b, 0], exponentials[b, 0])
        assert int(want[1][b, 0]) == expected


def planted_eos_case(vocab, ngram):
    """Rows whose outcome is forced through the random numbers, each with EOS somewhere else.

    Row 0: EOS is accepted draft 2 of 4. Row 1: EOS is the recovered token after one accepted draft.
    Row 2: EOS is the bonus. Row 3: EOS is the rejected draft only (never emitted). Row 4: finished.
    Row 5: no draft, a planted non-EOS bonus.
    """
    num_cols = 5
    q_lens = [5, 4, 3, 5, 5, 1]
    accept = [4, 1, 2, 1, 0, 0]  # drafts accepted
    batch = len(q_lens)
    target = torch.randn(batch, num_cols, vocab).softmax(-1)
    draft = torch.randn(batch, num_cols, vocab).softmax(-1)
    # Distinct tokens everywhere, so an EOS id planted at one spot occurs nowhere else.
    pool = torch.randperm(vocab)
    input_ids = pool[: batch * num_cols].view(batch, num_cols).clone()
    finals = pool[batch * num_cols : batch * num_cols + batch]
    uniforms = torch.rand(batch, num_cols)
    exponentials = torch.empty(batch, num_cols, vocab).exponential_() + 1.0  # >= 1: planted winners stand out
    for b, (q, a) in enumerate(zip(q_lens, accept, strict=True)):
        start = num_cols - q
        uniforms[b, start : start + a] = 0.0  # u * q = 0 < p: accepted
        col = start + a
        if a < q - 1:  # draft a + 1 is rejected: the target gives it no mass
            target[b, col, input_ids[b, col + 1]] = 0.0
        # The final token wins its race by far, and has room in max(p - q, 0).
        draft[b, col, finals[b]] = 0.0
        exponentials[b, col, finals[b]] = 1e-30
    eos = torch.stack([input_ids[0, 2], finals[1], finals[2], input_ids[3, 2]])
    finished = torch.tensor([False, False, False, False, True, False])
    q = torch.tensor(q_lens, dtype=torch.int32)
    args = (target, None if ngram else draft, input_ids, q, finished, eos, uniforms, exponentials)
    return args, finals


@pytest.mark.parametrize("vocab", [1000, BIG_VOCAB])
@pytest.mark.parametrize("ngram", [False, True])
def test_planted_eos(fresh_seed, ngram, vocab):
    args, finals = planted_eos_case(vocab, ngram)
    want = verify_sampling_reference(*args)
    num_emitted, emitted, finished_out = want
    assert num_emitted.tolist() == [2, 2, 3, 2, 0, 1]
    assert finished_out.tolist() == [True, True, True, False, True, False]
    input_ids = args[2]
    assert emitted[0, :2].tolist() == input_ids[0, 1:3].tolist()
    assert emitted[1, :2].tolist() == [int(input_ids[1, 2]), int(finals[1])]
    assert emitted[2, :3].tolist() == [int(input_ids[2, 3]), int(input_ids[2, 4]), int(finals[2])]
    assert emitted[3, :2].tolist() == [int(input_ids[3, 1]), int(finals[3])]
    assert emitted[5, 0] == finals[5]
    assert_same(loop_verify_sampling(*args), want)
    assert_same(run_triton(*args), want)
    check_invariants(want, input_ids, args[3], args[4], args[5])


@pytest.mark.parametrize("ngram", [False, True])
def test_equal_distributions_and_zeros(fresh_seed, ngram):
    """Where ``max(p - q, 0)`` is all zero the recovered token is drawn from ``p``; zero-mass entries never
    win, and an out-of-range ``u = 1`` forces a rejection even at ``p == q``."""
    vocab, num_cols = 50, 3
    target = torch.randn(4, num_cols, vocab).softmax(-1)
    target[:, :, ::3] = 0.0  # entries without mass
    target /= target.sum(-1, keepdim=True)
    input_ids = torch.randint(vocab, (4, num_cols))
    if ngram:
        # p one-hot on the draft equals q: rejected only with u = 1.
        target[:, 0] = torch.nn.functional.one_hot(input_ids[:, 1], vocab).float()
        draft = None
    else:
        draft = target.clone()
        input_ids[:, 1] = target[:, 0].argmax(-1)
    uniforms = torch.ones(4, num_cols)  # u = 1 rejects wherever p(x) <= q(x)
    exponentials = torch.empty(4, num_cols, vocab).exponential_()
    q = torch.full((4,), num_cols, dtype=torch.int32)
    args = (target, draft, input_ids, q, torch.zeros(4, dtype=torch.bool), [], uniforms, exponentials)
    want = verify_sampling_reference(*args)
    assert want[0].tolist() == [1, 1, 1, 1]
    for b in range(4):
        assert int(want[1][b, 0]) == race(target[b, 0], exponentials[b, 0])
        assert float(target[b, 0, want[1][b, 0]]) > 0
    assert_same(loop_verify_sampling(*args), want)
    assert_same(run_triton(*args), want)


def test_in_kernel_random_numbers(fresh_seed):
    """Philox draws are a pure function of (seed, offset); advancing offsets by the documented increment gives
    fresh numbers, and results match none of the earlier ones systematically."""
    target, draft, input_ids, q_lens, finished, eos, _, _ = random_case(12, 5, 1000, ngram=False)
    batch, num_cols, vocab = target.shape
    seeds = torch.randint(2**62, (batch,))
    offsets = torch.randint(2**40, (batch,))
    args = (target, draft, input_ids, q_lens, finished, eos)
    first = verify_sampling(*args, seeds, offsets, backend="triton")
    assert_same(verify_sampling(*args, seeds, offsets.clone(), backend="triton"), first)
    check_invariants(first, input_ids, q_lens, finished, eos)
    later = verify_sampling(
        *args, seeds, offsets + philox_offset_increment(num_cols, vocab), backend="triton"
    )
    check_invariants(later, input_ids, q_lens, finished, eos)
    live = ~finished
    # With V = 1000 and smooth distributions two independent draws almost never agree on every row.
    assert not torch.equal(first[1][live], later[1][live])


# ------------------------------------------------------------------------------------------------------------
# Statistical: the emitted tokens follow the target, whatever the draft
# ------------------------------------------------------------------------------------------------------------

# Target p_j and draft q_j at columns 0, 1 (column 2: target only). Chosen so that every wrong rule below is
# far from p in total variation while the first draft is accepted about half the time (sum min(p, q) = 0.56).
P0 = [0.01, 0.45, 0.03, 0.01, 0.45, 0.03, 0.01, 0.01]
Q0 = [0.07, 0.45, 0.22, 0.09, 0.01, 0.14, 0.01, 0.01]
STAT_P = torch.tensor([P0, P0[3:] + P0[:3], [0.3, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.4]])
STAT_Q = torch.tensor([Q0, Q0[3:] + Q0[:3], [1 / 8] * 8])


def wrong_rules(p: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
    """First-token distributions of plausible mistakes (``u < p/q`` already is ``min(1, p/q)``)."""
    overlap = torch.minimum(p, q)
    residual = (p - q).clamp(min=0)
    residual /= residual.sum()
    accept_p = q * p
    return {
        "resample from p, not p - q": overlap + (1 - overlap.sum()) * p,
        "accept every draft": q,
        "accept with probability p(x)": accept_p + (1 - accept_p.sum()) * residual,
        "accept with min(1, q/p)": q * torch.minimum(q / p, torch.ones_like(p))
        + (1 - (q * torch.minimum(q / p, torch.ones_like(p))).sum()) * residual,
    }


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def check_distribution(samples: torch.Tensor, p: torch.Tensor, what: str, q: torch.Tensor | None = None):
    """Frequencies within 5 standard errors of ``p`` and a total-variation bound; with ``q``, also check that
    the bound would reject every wrong rule at this sample size."""
    n = samples.numel()
    assert n > 0, what
    freq = torch.bincount(samples.cpu(), minlength=p.numel()).double() / n
    p = p.double()
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (
        f"{what}: n={n}, freq {freq.tolist()} vs p {p.tolist()}"
    )
    # The empirical TV averages 0.4 sum(se) with a standard deviation of 0.13 sum(se): 1.25 sum(se) is ~6 SD.
    bound = 1.25 * float(se.sum())
    tv = total_variation(freq, p)
    assert tv <= bound, f"{what}: TV {tv:.4f} > {bound:.4f} (n={n})"
    if q is not None:
        for name, wrong in wrong_rules(p, q.double()).items():
            # A wrong rule's sample lies within ~bound of its own law: caught if the laws are 2 bounds apart.
            assert total_variation(wrong, p) > 2 * bound, f"test too weak against {name!r} at n={n}"


def stat_batch(n: int, ngram: bool, device: str = "cpu"):
    vocab = STAT_P.shape[1]
    target = STAT_P.expand(n, 3, vocab).contiguous()
    draft = STAT_Q.expand(n, 3, vocab).contiguous()
    input_ids = torch.zeros(n, 3, dtype=torch.int64)
    # Drafts sampled from q. In n-gram mode the verifier takes them as certain (q one-hot), which is lossless
    # for any guessing process; a skewed one keeps "resample from p" detectable there too.
    input_ids[:, 1] = torch.multinomial(STAT_Q[0], n, replacement=True)
    input_ids[:, 2] = torch.multinomial(STAT_Q[1], n, replacement=True)
    q_lens = torch.full((n,), 3, dtype=torch.int32)
    finished = torch.zeros(n, dtype=torch.bool)
    tensors = (target, None if ngram else draft, input_ids, q_lens, finished)
    return tuple(t.to(device) if t is not None else None for t in tensors)


def check_lossless(out, input_ids, ngram: bool, with_third: bool):
    num_emitted, emitted, _ = (t.cpu() for t in out)
    assert (num_emitted >= 1).all() and (num_emitted <= 3).all()
    power = not ngram  # the wrong rules are stated for a sampled draft
    check_distribution(emitted[:, 0], STAT_P[0], "token 1", STAT_Q[0] if power else None)
    # The first draft is accepted with probability sum_x q(x) min(1, p(x)/q(x)) = sum min(p, q); in n-gram
    # mode a guess x is accepted with probability p(x).
    n = num_emitted.numel()
    accept_rate = float((num_emitted >= 2).double().mean())
    p0, q0 = STAT_P[0].double(), STAT_Q[0].double()
    expected = float((p0 * q0).sum() if ngram else torch.minimum(p0, q0).sum())
    assert abs(accept_rate - expected) <= 5 * (expected * (1 - expected) / n) ** 0.5, (accept_rate, expected)
    # Given that draft 1 was accepted, the next token follows the target at column 1 (and so on).
    second = emitted[num_emitted >= 2, 1]
    check_distribution(second, STAT_P[1], "token 2 | draft 1 accepted", STAT_Q[1] if power else None)
    if with_third:
        check_distribution(emitted[num_emitted == 3, 2], STAT_P[2], "token 3 (bonus) | drafts accepted")
    assert (emitted[num_emitted >= 2, 0] == input_ids.cpu()[num_emitted >= 2, 1]).all()


@pytest.mark.parametrize("ngram", [False, True])
def test_lossless_reference(fresh_seed, ngram):
    target, draft, input_ids, q_lens, finished = stat_batch(20_000, ngram)
    generator = torch.Generator().manual_seed(fresh_seed)
    out = verify_sampling_reference(target, draft, input_ids, q_lens, finished, [], generator=generator)
    check_lossless(out, input_ids, ngram, with_third=True)


def test_lossless_triton_philox(fresh_seed):
    """The kernel with its own Philox numbers: one seed for all rows, offsets a documented increment apart, so
    the rows only differ by their counters. The interpreter runs a program in ~50 ms, hence a smaller sample
    here (still large enough for the power checks); 20k rows on a GPU."""
    n = 20_000 if torch.cuda.is_available() else 1000
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target, draft, input_ids, q_lens, finished = stat_batch(n, ngram=False, device=device)
    increment = philox_offset_increment(3, STAT_P.shape[1])
    seeds = torch.full((n,), fresh_seed, dtype=torch.int64, device=device)
    offsets = (torch.randint(2**40, ()) + torch.arange(n) * increment).to(device)
    out = verify_sampling(target, draft, input_ids, q_lens, finished, [], seeds, offsets, backend="triton")
    check_lossless(out, input_ids, ngram=False, with_third=torch.cuda.is_available())


# ------------------------------------------------------------------------------------------------------------
# Dispatch and validation
# ------------------------------------------------------------------------------------------------------------


def test_dispatch_on_cpu(fresh_seed):
    target, draft, input_ids, q_lens, finished, eos, uniforms, exponentials = random_case(
        5, 4, 100, ngram=False
    )
    args = (target, draft, input_ids, q_lens, finished, eos)
    want = verify_sampling_reference(*args, uniforms, exponentials)
    for backend in ("auto", "torch", "cuda", "triton"):  # "cuda" has no kernel here: it falls back as "auto"
        assert_same(verify_sampling(*args, None, None, uniforms, exponentials, backend=backend), want)
    # Without explicit numbers the torch path draws from torch's default generator.
    torch.manual_seed(fresh_seed)
    one = verify_sampling(*args, None, None, backend="torch")
    torch.manual_seed(fresh_seed)
    assert_same(verify_sampling(*args, None, None, backend="torch"), one)
    with pytest.raises(ValueError):
        verify_sampling(*args, None, None, uniforms, backend="triton")  # needs seeds and offsets
    with pytest.raises(ValueError):
        verify_sampling_reference(target.double(), draft, *args[2:])
    with pytest.raises(ValueError):
        verify_sampling_reference(target, draft[:, :-1], *args[2:])
    with pytest.raises(ValueError):
        verify_sampling_reference(*args, uniforms[:, :-1])


def test_empty_batch():
    target = torch.zeros(0, 3, 10)
    ids = torch.zeros(0, 3, dtype=torch.int64)
    q = torch.zeros(0, dtype=torch.int32)
    fin = torch.zeros(0, dtype=torch.bool)
    seeds = torch.zeros(0, dtype=torch.int64)
    for out in (
        verify_sampling(target, None, ids, q, fin, [1], seeds, seeds, backend="triton"),
        verify_sampling_reference(target, None, ids, q, fin, [1]),
    ):
        assert [tuple(t.shape) for t in out] == [(0,), (0, 3), (0,)]


# ------------------------------------------------------------------------------------------------------------
# Greedy: the Triton kernel against the greedy reference
# ------------------------------------------------------------------------------------------------------------


def compare_greedy(logits, input_ids, q_lens, finished, eos):
    got = verify_greedy(logits, input_ids, q_lens, finished, eos, backend="triton")
    want = verify_greedy_reference(logits, input_ids, q_lens, finished, eos)
    assert_same(got, want)
    return got


@pytest.mark.parametrize(
    ("vocab", "dtype"),
    [(1000, torch.float32), (1000, torch.float16), (1000, torch.bfloat16), (BIG_VOCAB, torch.bfloat16)],
)
def test_greedy_triton_planted(fresh_seed, vocab, dtype):
    num_cols = 5 if vocab == BIG_VOCAB else 8
    batch = 3 if vocab == BIG_VOCAB else 10
    q_lens = torch.randint(1, num_cols + 1, (batch,)).tolist()
    q_lens[0] = num_cols
    accepted = [int(torch.randint(0, q, ())) for q in q_lens]
    accepted[0] = num_cols - 1  # one row takes the bonus
    logits, input_ids, q, predictions = planted_case(q_lens, num_cols, vocab, accepted, dtype)
    finished = torch.zeros(batch, dtype=torch.bool)
    finished[-1] = True
    eos = torch.stack([predictions[1, -1], predictions[0, 2]])  # the second cuts row 0 inside its run
    out = compare_greedy(logits, input_ids, q, finished, eos)
    assert out[0][0] == 3 and out[2][0]
    compare_greedy(logits, input_ids, q, finished, eos[:0])


def test_greedy_triton_ties_and_specials(fresh_seed):
    # Integer logits: ties everywhere; drafts copy the argmax for a random prefix, so acceptance hinges on the
    # tie rule. Vocab 20,000 spans several 8192-wide interpreter blocks.
    batch, num_cols, vocab = 8, 6, 20_000
    logits = torch.randint(-2, 2, (batch, num_cols, vocab)).float()
    input_ids = torch.randint(vocab, (batch, num_cols))
    shifted = torch.cat([input_ids[:, :1], logits.argmax(-1)[:, :-1]], dim=1)
    prefix = torch.randint(0, num_cols, (batch, 1))
    input_ids = torch.where(torch.arange(num_cols) <= prefix, shifted, input_ids)
    q_lens = torch.randint(1, num_cols + 1, (batch,), dtype=torch.int32)
    compare_greedy(logits, input_ids, q_lens, torch.rand(batch) < 0.2, torch.tensor([0, 1]))

    special = torch.zeros(6, 1, vocab)
    special[0, 0, [7, 9000, 19_999]] = 2.0  # tie across blocks -> 7
    special[1, 0, [19_999, 16_000]] = 1.0  # tie in later blocks -> 16,000
    special[2] = -float("inf")  # all -inf -> 0
    special[3, 0, [12_000, 9_000]] = float("nan")  # the first NaN wins, even over +inf and a later NaN
    special[3, 0, 10] = float("inf")
    special[4, 0, 15_000] = float("nan")  # a NaN in a later block beats an earlier maximum
    special[4, 0, 3] = 5.0
    ones = torch.ones(6, dtype=torch.int32)
    _, emitted, _ = compare_greedy(
        special, torch.zeros(6, 1, dtype=torch.int64), ones, torch.zeros(6, dtype=torch.bool), []
    )
    assert emitted[:, 0].tolist() == [7, 16_000, 0, 9_000, 15_000, 0]


def test_greedy_triton_strided(fresh_seed):
    q_lens = [4, 2, 3]
    logits, input_ids, q, _ = planted_case(q_lens, 4, 1001, [3, 0, 1], torch.float16)
    wide = torch.randn(3, 6, 1003).half()
    wide[:, 2:, 1:-1] = logits
    wide_ids = torch.randint(1001, (3, 8))
    wide_ids[:, 1::2] = input_ids
    compare_greedy(wide[:, 2:, 1:-1], wide_ids[:, 1::2], q, torch.zeros(3, dtype=torch.bool), [5])
    out = verify_greedy_triton(
        logits[:0], input_ids[:0], q[:0], torch.zeros(0, dtype=torch.bool), torch.tensor([5])
    )
    assert [tuple(t.shape) for t in out] == [(0,), (0, 4), (0,)]


# ------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
class TestVerifySamplingCuda:
    """The compiled Triton kernels on CUDA tensors."""

    @pytest.mark.parametrize("vocab", [1000, 32_003, BIG_VOCAB])
    @pytest.mark.parametrize("ngram", [False, True])
    def test_matches_reference(self, fresh_seed, vocab, ngram):
        case = random_case(8, 6, vocab, ngram=ngram, device="cuda")
        want = verify_sampling_reference(*case)
        for chunks in (None, 1, 3):
            assert_same(run_triton(*case, num_chunks=chunks), want)
        assert_same(verify_sampling(*case[:6], None, None, *case[6:]), want)  # "auto" takes Triton on CUDA

    def test_greedy_matches_reference(self, fresh_seed):
        q_lens = [6, 3, 1, 5]
        logits, input_ids, q, predictions = planted_case(
            q_lens, 6, BIG_VOCAB, [5, 1, 0, 2], torch.bfloat16, "cuda"
        )
        finished = torch.tensor([False, False, False, True], device="cuda")
        got = verify_greedy_triton(logits, input_ids, q, finished, predictions[0, 3:4])
        assert_same(got, verify_greedy_reference(logits, input_ids, q, finished, predictions[0, 3:4]))

    def test_no_host_sync_and_graph_capture(self, fresh_seed):
        target, draft, input_ids, q_lens, finished, eos, _, _ = random_case(
            4, 5, 5000, ngram=False, device="cuda"
        )
        seeds = torch.randint(2**62, (4,), device="cuda")
        offsets = torch.zeros(4, dtype=torch.int64, device="cuda")
        args = (target, draft, input_ids, q_lens, finished, eos, seeds)
        want = verify_sampling(*args, offsets.clone())
        torch.cuda.set_sync_debug_mode("error")
        try:
            verify_sampling(*args, offsets)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            verify_sampling(*args, offsets)  # compile and warm up off the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = verify_sampling(*args, offsets)
            offsets.add_(philox_offset_increment(5, 5000))  # the caller's advance, captured too
        offsets.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert_same(out, want)
        assert (offsets == philox_offset_increment(5, 5000)).all()
