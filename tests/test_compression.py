"""The compressed stacking is an exact stand-in for the dense one (CLAIR step 1)."""

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clair_lightning import clair_aggregate
from clair_lightning.core import decomposition
from clair_lightning.core.compression import (
    StackingCore,
    _row_norms,
    compress_module,
    compress_with_gram,
    row_basis_gram,
    stacking_core,
    stacking_gram,
)
from clair_lightning.core.decomposition import _pooled_block_norms, block_outlier_pursuit
from clair_lightning.core.gram import compressed_product_gram, product_gram, squared_distances
from clair_lightning.core.synthetic import synthetic_federation
from clair_lightning.core.updates import validate_updates


def _dense_stacking(updates, name):
    return torch.cat([u[name][0] @ u[name][1] for u in updates], dim=1)


@st.composite
def federations(draw):
    num_clients = draw(st.integers(2, 6))
    d_out = draw(st.integers(2, 24))
    d_in = draw(st.integers(1, 24))
    ranks = draw(st.lists(st.integers(1, 5), min_size=num_clients, max_size=num_clients))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    updates = [
        {
            "m": (
                torch.randn(d_out, rank, generator=generator, dtype=torch.float64),
                torch.randn(rank, d_in, generator=generator, dtype=torch.float64),
            )
        }
        for rank in ranks
    ]
    return updates


@settings(max_examples=60, deadline=None)
@given(federations())
def test_compression_preserves_singular_values_and_block_norms(updates):
    validated = validate_updates(updates)
    module = compress_module(validated, "m", validated.included)
    dense = _dense_stacking(updates, "m")

    d_in = dense.shape[1] // len(updates)
    widths = [min(u["m"][0].shape[1], d_in) for u in updates]
    assert module.stacked.shape == (dense.shape[0], sum(widths))
    dense_values = torch.linalg.svdvals(dense)
    compressed_values = torch.linalg.svdvals(module.stacked)
    count = min(len(dense_values), len(compressed_values))
    torch.testing.assert_close(
        compressed_values[:count], dense_values[:count], atol=1e-9, rtol=1e-7
    )
    rest = dense_values[count:]
    assert rest.numel() == 0 or float(rest.max()) < 1e-9 * max(float(dense_values[0]), 1.0)
    dense_norms = torch.stack([(u["m"][0] @ u["m"][1]).norm() for u in updates])
    torch.testing.assert_close(module.norms, dense_norms, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(federations())
def test_core_has_the_normalised_stackings_spectrum(updates):
    validated = validate_updates(updates)
    module = compress_module(validated, "m", validated.included)
    core = stacking_core(module)
    normalised = module.stacked / module.norms[module.block_owner]
    expected = torch.linalg.svdvals(normalised)
    got = torch.linalg.svdvals(core.matrix)
    torch.testing.assert_close(got, expected[: len(got)], atol=1e-8, rtol=1e-6)
    assert abs(core.nuclear_norm - float(expected.sum())) <= 1e-6 * float(expected.sum())


@settings(max_examples=25, deadline=None)
@given(federations())
def test_decomposition_scores_match_the_dense_stacking(updates):
    """Block outlier pursuit on the compressed core and on the dense stacking agree."""
    validated = validate_updates(updates)
    module = compress_module(validated, "m", validated.included)
    compressed = block_outlier_pursuit(
        [stacking_core(module)],
        [module.block_owner],
        len(updates),
        svd="full",
        tolerance=1e-9,
        max_iterations=3000,
    )
    d_in = updates[0]["m"][1].shape[1]
    dense = torch.cat([(b @ a) / (b @ a).norm() for b, a in (u["m"] for u in updates)], dim=1)
    owner = torch.arange(len(updates)).repeat_interleave(d_in)
    direct = block_outlier_pursuit(
        [StackingCore.from_matrix(dense)],
        [owner],
        len(updates),
        svd="full",
        tolerance=1e-9,
        max_iterations=3000,
    )
    assert compressed.lam == direct.lam or abs(compressed.lam - direct.lam) < 1e-7 * direct.lam
    torch.testing.assert_close(
        compressed.sparse_fraction, direct.sparse_fraction, atol=1e-5, rtol=0
    )


def test_rank_deficient_noiseless_stacking_uses_a_smaller_core():
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(30, 2, generator=generator, dtype=torch.float64)
    updates = [
        {
            "m": (
                shared @ torch.randn(2, 3, generator=generator, dtype=torch.float64),
                torch.randn(3, 20, generator=generator, dtype=torch.float64),
            )
        }
        for _ in range(5)
    ]
    validated = validate_updates(updates)
    core = stacking_core(compress_module(validated, "m", validated.included))
    assert core.matrix.shape == (2, 15)


@settings(max_examples=60, deadline=None)
@given(federations(), st.booleans())
def test_product_gram_from_the_compression_equals_the_factors_gram(updates, repeat_a_row):
    """The collusion check's Gram, formed from the core's stacking Gram, is the exact one."""
    if repeat_a_row:  # rank-deficient A: the compression takes a QR instead of Cholesky-QR
        b, a = updates[0]["m"]
        updates[0]["m"] = (b, torch.cat([a[:1], a[:1], a[2:]]) if len(a) > 1 else a)
    updates.append({"m": tuple(t.clone() for t in updates[-1]["m"])})  # an exact copy
    validated = validate_updates(updates)
    module = compress_module(validated, "m", validated.included)
    compressed = compressed_product_gram(validated, module, stacking_gram(module))
    expected = product_gram(validated)
    scale = float(expected.diagonal().max())
    torch.testing.assert_close(compressed, expected, atol=1e-9 * scale, rtol=1e-7)
    if stacking_gram(module) is not None:
        distance = squared_distances(compressed)[-1, -2]
        assert float(distance) <= 1e-12 * scale


def test_row_norms_neither_overflow_nor_underflow_in_float32():
    """Float32 norms where every square is safe, float64 blocks where one is not."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 64, generator=generator)
    expected = torch.linalg.vector_norm(rows.double(), dim=1)
    torch.testing.assert_close(_row_norms(rows).double(), expected, rtol=1e-6, atol=0)
    rows[7] *= 1e25  # squares overflow float32
    rows[9] *= 1e-25  # squares underflow
    rows[11] = 0.0
    expected = torch.linalg.vector_norm(rows.double(), dim=1)
    torch.testing.assert_close(_row_norms(rows), expected, rtol=1e-12, atol=0)


def test_stacking_is_applied_from_the_factors():
    generator = torch.Generator().manual_seed(1)
    updates = [
        {"m": (torch.randn(40, r, generator=generator), torch.randn(r, 30, generator=generator))}
        for r in (2, 5, 3)
    ]
    validated = validate_updates(updates)
    module = compress_module(validated, "m", validated.included)
    vectors = torch.randn(module.block_owner.numel(), 4, generator=generator)
    torch.testing.assert_close(module.stacked_times(vectors), module.stacked @ vectors)


def test_compression_reuses_the_validations_row_grams_bit_for_bit():
    """The ``A Aᵀ`` the validation's norms took is the compression's Cholesky input: same
    factors and stacking as without it; kept only where the norm took it of the very tensor
    the compression uses (not for half-precision inputs cast afterwards, nor float64)."""
    generator = torch.Generator().manual_seed(2)
    updates = [
        {
            name: (torch.randn(40, r, generator=generator), torch.randn(r, 30, generator=generator))
            for name in ("m1", "m2")
        }
        for r in (2, 5, 3, 4)
    ]
    updates[1]["m2"] = (torch.zeros(40, 5), updates[1]["m2"][1])  # B = 0: no norm, no Gram
    validated = validate_updates(updates)
    assert set(validated.row_grams) == {(k, n) for k in range(4) for n in ("m1", "m2")} - {
        (1, "m2")
    }
    without = dataclasses.replace(validated, row_grams={})
    for name in ("m1", "m2"):
        reused, _, stacked = compress_with_gram(validated, name, validated.included)
        computed, _, stacked_here = compress_with_gram(without, name, validated.included)
        assert torch.equal(stacked, stacked_here) and torch.equal(reused.norms, computed.norms)
        for got, expected in zip(reused.row_factors, computed.row_factors, strict=True):
            assert torch.equal(got, expected)
    for dtype in (torch.float16, torch.float64):
        cast = [{n: (b.to(dtype), a.to(dtype)) for n, (b, a) in u.items()} for u in updates]
        assert validate_updates(cast).row_grams == {}


def _textbook_inexact_alm(cores, owners, num_clients, lam, spectral, iterations):
    """The inexact ALM written plainly, all modules at once (what the per-module loop equals)."""
    norms = _pooled_block_norms(cores, owners, num_clients)
    duals = [core / max(spectral, float(norms.max()) / lam) for core in cores]
    penalty = 1.25 / spectral
    sparse = [torch.zeros_like(core) for core in cores]
    for _ in range(iterations):
        low_rank = []
        for core, y, c in zip(cores, duals, sparse, strict=True):
            u, s, vh = torch.linalg.svd(core + y / penalty - c, full_matrices=False)
            low_rank.append((u * (s - 1 / penalty).clamp_min(0)) @ vh)
        targets = [
            core - low + y / penalty for core, low, y in zip(cores, low_rank, duals, strict=True)
        ]
        target_norms = _pooled_block_norms(targets, owners, num_clients)
        tau = lam / penalty
        factors = torch.where(target_norms > tau, 1 - tau / target_norms.clamp_min(1e-30), 0.0)
        sparse = [t * factors[owner] for t, owner in zip(targets, owners, strict=True)]
        duals = [
            y + penalty * (core - low - c)
            for core, low, c, y in zip(cores, low_rank, sparse, duals, strict=True)
        ]
        penalty *= 1.5
    return low_rank, sparse


def test_inexact_alm_equals_the_textbook_iteration():
    generator = torch.Generator().manual_seed(2)
    shared = torch.randn(50, 3, generator=generator, dtype=torch.float64)
    updates = [
        {
            name: (
                (shared if k > 1 else torch.randn(50, 3, generator=generator, dtype=torch.float64))
                @ torch.randn(3, 4, generator=generator, dtype=torch.float64),
                torch.randn(4, 30, generator=generator, dtype=torch.float64),
            )
            for name in ("m1", "m2")
        }
        for k in range(8)
    ]
    validated = validate_updates(updates)
    modules = [compress_module(validated, name, validated.included) for name in ("m1", "m2")]
    cores = [stacking_core(module) for module in modules]
    owners = [module.block_owner for module in modules]
    result = block_outlier_pursuit(cores, owners, 8, svd="full", max_iterations=6, tolerance=0)
    matrices = [core.matrix for core in cores]
    spectral = max(core.spectral_norm for core in cores)
    low_rank, sparse = _textbook_inexact_alm(matrices, owners, 8, result.lam, spectral, 6)
    for got, expected in zip(result.low_rank + result.sparse, low_rank + sparse, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)


def _count_certified(monkeypatch):
    """Count the thresholdings the certified subspace iteration answers (not the full SVD),
    and those of a spectral function of the core answered from its own SVD."""
    counts = {"certified": 0, "tried": 0, "first": [], "spectral": 0}
    certified_svd = decomposition._SvtState._certified_svd
    threshold_spectral = decomposition._SvtState.threshold_spectral

    def counting_spectral(self, *args, **kwargs):
        counts["spectral"] += 1
        return threshold_spectral(self, *args, **kwargs)

    def counting(self, module, matrix, tau):
        first = self._bases[module] is None
        result = certified_svd(self, module, matrix, tau)
        counts["tried"] += 1
        counts["certified"] += result is not None
        if first:
            counts["first"].append(result is not None)
        return result

    monkeypatch.setattr(decomposition._SvtState, "_certified_svd", counting)
    monkeypatch.setattr(decomposition._SvtState, "threshold_spectral", counting_spectral)
    return counts


def _record_certificates(monkeypatch) -> list[tuple[torch.dtype, int, bool]]:
    """Dtype, number of blocks and verdict of every block test the certificates ask for."""
    verdicts = []
    blocks_below = decomposition._blocks_below

    def recording(blocks, squared_bound, eps):
        verdict = blocks_below(blocks, squared_bound, eps)
        verdicts.append((blocks.dtype, blocks.shape[0], verdict))
        return verdict

    monkeypatch.setattr(decomposition, "_blocks_below", recording)
    return verdicts


def test_certified_thresholding_finds_a_direction_its_warm_basis_misses(monkeypatch):
    """A new singular value above τ, orthogonal to the warm basis, fails the certificate."""
    counts = _count_certified(monkeypatch)
    verdicts = _record_certificates(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    n, tau = 96, 1.0
    left = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
    values = torch.cat([torch.linspace(5.0, 2.0, 6), 0.5 * torch.rand(n - 6, generator=generator)])
    values = values.to(torch.float64)
    solver = decomposition._SvtState(1, None)
    first = ((left * values) @ right.T).float()  # float64 cores keep the full SVD
    solver.threshold(0, first, tau)  # full SVD, stores the warm basis
    solver.threshold(0, first, tau)
    assert counts == {"certified": 1, "tried": 2, "first": [False], "spectral": 0}
    assert solver.ranks == [6]
    # The warm basis holds the top 6 + 9 right vectors; give a direction outside it 1.5 τ.
    values[-1] = 1.5
    second = ((left * values) @ right.T).float()
    thresholded = solver.threshold(0, second, tau)
    # The warm iteration converges (the basis is invariant up to rounding); the certificate fails.
    # Certified in float32 by the four blocks at first (σ_7 < τ/2); the second certificate
    # fails in four blocks and whole (float32 rounding is far below τ: float64 is not asked).
    f32 = torch.float32
    assert verdicts == [(f32, 4, True), (f32, 4, False), (f32, 1, False)], verdicts
    assert counts == {"certified": 1, "tried": 3, "first": [False], "spectral": 0}
    assert solver.ranks == [7]
    u, s, vh = torch.linalg.svd(second)
    torch.testing.assert_close(thresholded, (u * (s - tau).clamp_min(0)) @ vh, atol=1e-5, rtol=0)
    double = decomposition._SvtState(1, None)
    for _ in range(2):
        double.threshold(0, second.double(), tau)
    assert counts["tried"] == 5 and counts["certified"] == 1  # float64: always the full SVD


def test_certified_thresholding_stops_within_its_ritz_tolerance_of_the_exact_svt(monkeypatch):
    """A warm basis near the converged one (an ALM's previous iterate): after the float32
    power step the first float64 sweep leaves a Ritz residual of about 8ε‖M‖_F, above 4ε‖M‖_F
    (a second sweep at that tolerance), below ``_RITZ_TOLERANCE · ε‖M‖_F``; the rank is the full
    SVD's and ``D_τ`` within that tolerance of the exact one computed in float64."""
    sweeps = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda x: sweeps.append(x.shape) or eigh(x))
    generator = torch.Generator().manual_seed(4)
    n, tau, rank = 128, 1.0, 10
    left = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
    tail = 0.5 * torch.rand(n - rank, generator=generator, dtype=torch.float64)
    values = torch.cat([torch.logspace(2, 0.5, rank, dtype=torch.float64), tail])
    matrix = ((left * values) @ right.T).float()
    u, s, vh = torch.linalg.svd(matrix.double())
    exact = (u * (s - tau).clamp_min(0)) @ vh
    warm = vh[: rank + decomposition._CERTIFIED_EXTRA + 1].T
    warm = (warm + 3e-4 * torch.randn(warm.shape, generator=generator, dtype=warm.dtype)).float()
    results = {}
    for tolerance in (4.0, decomposition._RITZ_TOLERANCE):
        monkeypatch.setattr(decomposition, "_RITZ_TOLERANCE", tolerance)
        solver = decomposition._SvtState(1, None)
        solver.ranks, solver._bases = [rank], [warm]
        sweeps.clear()
        results[tolerance] = solver.threshold(0, matrix, tau), len(sweeps), solver.ranks
    assert [(count, ranks) for _, count, ranks in results.values()] == [(2, [rank]), (1, [rank])]
    bound = decomposition._RITZ_TOLERANCE * torch.finfo(torch.float32).eps * float(s.norm())
    for thresholded, _, _ in results.values():
        assert float((thresholded.double() - exact).norm()) <= bound


def test_thresholding_a_spectral_function_of_the_core_is_its_own_svd_shrunk():
    """While C = 0 the ALM's targets are ``M V diag(f) Vᵀ`` for the core ``M = U diag(s) Vᵀ``:
    their ``D_τ`` from the core's right singular vectors and values (the Gram's
    eigendecomposition) equals the full SVD's, keeps the same rank, reports each value's kept
    share and leaves the next thresholding its basis, ordered by ``s ⊙ f``; float64 cores,
    the textbook solver and cores below the certified size keep their own path."""
    generator = torch.Generator().manual_seed(1)
    updates = [
        {"m": (torch.randn(200, 8, generator=generator), torch.randn(8, 150, generator=generator))}
        for _ in range(12)
    ]
    validated = validate_updates(updates)
    core = stacking_core(compress_module(validated, "m", validated.included))
    matrix = core.matrix
    vectors, values = core.right_singular
    solver = decomposition._SvtState(1, None)
    solver.start_from(0, core.right_singular)
    uniform = solver.spectral_start(0, matrix, 0.3)
    reordered = uniform.clone()
    reordered[7] = 4.0  # the 8th direction moves to the top
    for multipliers in (1.0 + uniform, reordered):
        target = float(values[4] + values[5]) / 2 * 1.3  # a threshold between two values
        out = torch.empty_like(matrix)
        result, kept = solver.threshold_spectral(0, matrix, multipliers, target, out=out)
        spectral = (matrix.double() @ vectors.double()) * multipliers @ vectors.double().T
        u, s, vh = torch.linalg.svd(spectral)
        expected = (u * (s - target).clamp_min(0)) @ vh
        assert result is out and solver.ranks == [int((s > target).sum())]
        torch.testing.assert_close(result.double(), expected, atol=1e-5 * float(s[0]), rtol=0)
        shares = (multipliers - target / values.double()).clamp_min(0)
        torch.testing.assert_close(kept, shares)
        first = 7 if multipliers is reordered else 0  # the bases are ordered by s ⊙ f
        torch.testing.assert_close(solver._bases[0][:, 0], vectors[:, first], rtol=0, atol=0)
        assert solver._bases[0].shape[1] == solver.ranks[0] + decomposition._CERTIFIED_EXTRA + 1
    for dtype, full in ((torch.float64, False), (torch.float32, True)):
        other = decomposition._SvtState(1, None, full=full)
        other.start_from(0, core.right_singular)
        assert other.spectral_start(0, matrix.to(dtype), 0.3) is None
    small = decomposition._SvtState(1, None)
    small.start_from(0, core.right_singular)
    assert small.spectral_start(0, matrix[:32, :32], 0.3) is None


def test_tail_certificate_never_passes_a_singular_value_at_or_above_tau(monkeypatch):
    """``_tail_below`` proves ``σ_{k+1} < τ`` (τ = 1) from any rank-k deflation, or says it
    cannot: it is False whenever ``σ_{k+1} ≥ τ``, True below by as many blocks as the estimate
    allows, and hands over to float64 (None) where the float32 rounding of the deflation is
    not small against τ."""
    generator = torch.Generator().manual_seed(5)
    n, k = 128, 6
    left = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
    verdicts = _record_certificates(monkeypatch)
    # (σ_1..σ_k, σ_{k+1}, the estimate of σ_{k+1} that picks the blocks, verdict, blocks tried)
    for top, tail, estimate, expected, blocks in [
        (10.0, 0.4, 0.4, True, [(4, True)]),
        (10.0, 0.6, 0.6, True, [(2, True)]),
        (10.0, 0.9, 0.9, True, [(1, True)]),
        (10.0, 0.9, 0.0, True, [(4, False), (1, True)]),  # an estimate too low costs a try
        (10.0, 1.0, 1.0, False, [(1, False)]),
        (10.0, 1.02, 0.0, False, [(4, False), (1, False)]),
        (1e6, 0.4, 0.4, None, []),  # float32: ‖M‖_F/τ too large
    ]:
        verdicts.clear()
        values = torch.cat([torch.full((k,), top), tail * torch.linspace(1.0, 0.1, n - k)])
        matrix = (left * values.to(torch.float64)) @ right.T
        # A slightly wrong basis: still a rank-k deflation, so still a valid certificate.
        basis = right[:, :k] + 1e-9 * torch.randn(n, k, generator=generator, dtype=torch.float64)
        image = matrix @ basis
        verdict = decomposition._tail_below(matrix.float(), image, basis, 1.0, estimate)
        assert verdict is expected, (top, tail, verdict)
        assert [(count, passed) for _, count, passed in verdicts] == blocks, (tail, verdicts)
        if expected is None:
            assert decomposition._tail_below(matrix, image, basis, 1.0, estimate) is True


def test_certified_thresholding_gives_the_full_svd_solution(monkeypatch):
    """Cores of 64–256 columns: same ranks, iterations and scores as a full SVD per iteration."""
    counts = _count_certified(monkeypatch)
    certificates = _record_certificates(monkeypatch)
    generator = torch.Generator().manual_seed(3)
    federation = synthetic_federation(
        12,
        d_out=300,
        d_in=200,
        rank=8,
        subspace_rank=4,
        noise=0.05,
        num_modules=2,
        generator=generator,
        dtype=torch.float32,
    )
    updates = [dict(update) for update in federation.updates]
    for k in (0, 5):  # two clients off the shared subspace
        for name, (b, a) in updates[k].items():
            updates[k][name] = (torch.randn(b.shape, generator=generator) * b.norm() / 20, a)
    validated = validate_updates(updates)
    modules = [compress_module(validated, n, validated.included) for n in validated.module_names]
    cores = [stacking_core(module) for module in modules]
    assert all(core.matrix.shape == (96, 96) for core in cores)
    owners = [module.block_owner for module in modules]
    results = {
        svd: block_outlier_pursuit(cores, owners, 12, svd=svd, generator=torch.Generator())
        for svd in ("full", "auto")
    }
    full, certified = results["full"], results["auto"]
    assert counts["certified"] >= counts["tried"] // 2 > 0, counts
    # While C = 0 the targets are spectral functions of the core, thresholded from its own
    # right singular vectors and values, so every certified one starts from a previous basis.
    assert all(core.right_singular is not None for core in cores)
    assert counts["first"] == [] and counts["spectral"] >= 2, counts
    # Certified in float32, by row blocks of the deflated core (four where σ_{k+1} is well
    # below τ), each at its first try.
    f32 = torch.float32
    assert (f32, 4, True) in certificates and all(passed for _, _, passed in certificates)
    assert {dtype for dtype, _, _ in certificates} == {f32}
    assert certified.low_rank_ranks == full.low_rank_ranks
    assert certified.iterations == full.iterations and certified.lam == full.lam
    torch.testing.assert_close(certified.sparse_fraction, full.sparse_fraction, atol=1e-6, rtol=0)
    for got, expected in zip(
        certified.low_rank + certified.sparse, full.low_rank + full.sparse, strict=True
    ):
        torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    aggregated = clair_aggregate(updates)
    monkeypatch.setattr(decomposition._SvtState, "_certified_svd", lambda *args: None)
    textbook = clair_aggregate(updates)
    assert aggregated.contaminated == textbook.contaminated
    assert aggregated.contaminated[0] and aggregated.contaminated[5]
    assert aggregated.diagnostics["low_rank_ranks"] == textbook.diagnostics["low_rank_ranks"]
    torch.testing.assert_close(
        torch.tensor(aggregated.scores), torch.tensor(textbook.scores), atol=1e-4, rtol=1e-4
    )
    for got, expected in zip(aggregated.refined, textbook.refined, strict=True):
        for name, (b, a) in got.items():
            b_ref, a_ref = expected[name]
            torch.testing.assert_close(b @ a, b_ref @ a_ref, atol=1e-6, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(federations(), st.booleans(), st.randoms(use_true_random=False))
def test_row_basis_gram_gives_the_stacked_a_gram_of_any_clients(updates, repeat_a_row, random):
    """The collusion check's row-basis Gram, kept for the write-back, gives the exact Gram of
    any subset's stacked ``A`` (rank-deficient ``A`` and ``r > d_in`` included)."""
    if repeat_a_row:
        b, a = updates[0]["m"]
        updates[0]["m"] = (b, torch.cat([a[:1], a[:1], a[2:]]) if len(a) > 1 else a)
    validated = validate_updates(updates)
    module = compress_module(validated, "m", validated.included)
    basis_gram = row_basis_gram(validated, module)
    clients = sorted(random.sample(validated.included, random.randint(1, len(updates))))
    stacked_a = torch.cat([updates[k]["m"][1] for k in clients])
    expected = stacked_a @ stacked_a.T
    scale = float(expected.diagonal().max())
    torch.testing.assert_close(
        basis_gram.stacked_a_gram(clients), expected, atol=1e-9 * scale, rtol=1e-7
    )
    compressed = compressed_product_gram(validated, module, stacking_gram(module), basis_gram)
    if stacking_gram(module) is not None:
        formed_here = compressed_product_gram(validated, module, stacking_gram(module))
        torch.testing.assert_close(compressed, formed_here, rtol=0, atol=0)
    together, gram, _ = compress_with_gram(validated, "m", validated.included)  # one stacking
    torch.testing.assert_close(together.norms, module.norms, rtol=0, atol=0)
    assert (gram is None) == (stacking_gram(module) is None)
    if gram is not None:
        torch.testing.assert_close(gram, stacking_gram(module), rtol=0, atol=0)


def test_randomized_thresholding_of_a_large_core_gives_the_full_svd_solution():
    """Cores above 256 columns take the randomized SVD (cold, then warm-started from the
    previous right singular vectors): same kept rank and ``D_τ`` as a full SVD."""
    generator = torch.Generator().manual_seed(4)
    size = decomposition._FULL_SVD_MAX_SIZE + 44
    signal = torch.randn(size, 6, generator=generator) @ torch.randn(6, size, generator=generator)
    solver = decomposition._SvtState(1, torch.Generator().manual_seed(0))
    for step in range(2):
        matrix = signal + 0.01 * torch.randn(size, size, generator=generator)
        tau = 0.5 * float(torch.linalg.svdvals(matrix)[5])
        thresholded = solver.threshold(0, matrix, tau)
        u, s, vh = torch.linalg.svd(matrix)
        assert solver.ranks == [int((s > tau).sum())] == [6], step
        expected = (u * (s - tau).clamp_min(0)) @ vh
        torch.testing.assert_close(
            thresholded, expected, atol=1e-4 * float(expected.abs().max()), rtol=0
        )


def test_a_stacking_with_fewer_rows_than_columns_gets_a_core_of_its_rank():
    """Its Gram is singular; a rounded Cholesky can still succeed and add a spurious direction."""
    generator = torch.Generator().manual_seed(0)
    for ranks in ([2, 2, 5, 1, 1, 2], [3, 3, 3, 2]):
        updates = [
            {
                "m": (
                    torch.randn(9, r, generator=generator, dtype=torch.float64),
                    torch.randn(r, 3, generator=generator, dtype=torch.float64),
                )
            }
            for r in ranks
        ]
        validated = validate_updates(updates)
        module = compress_module(validated, "m", validated.included)
        assert module.stacked.shape[0] < module.stacked.shape[1]
        core = stacking_core(module)
        assert core.matrix.shape[0] <= module.d_out
        expected = torch.linalg.svdvals(module.stacked / module.norms[module.block_owner])
        torch.testing.assert_close(
            torch.linalg.svdvals(core.matrix), expected, atol=1e-8, rtol=1e-6
        )
