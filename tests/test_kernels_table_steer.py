"""The graph-safe table step (kernels/table_steer.py) against THE reference
(kernels/table_steer_reference.py): every SAE kind, both signs, several multipliers, dense and
YaPO rows mixed in one batch, odd shapes; rows rewritten and cleared; compiled with
torch.compile(fullgraph=True) without recompiling when tables, slot map or multipliers change; run
on meta tensors (any host read of a value would fail there)."""

import pytest
import torch
from helpers import SAE_KINDS, random_latent, random_sae

from yapo_fast.errors import YapoFastError
from yapo_fast.kernels.sparse_steer_prepare import prepare_sparse_steer
from yapo_fast.kernels.table_steer import SteerTable, table_steer
from yapo_fast.kernels.table_steer_reference import table_steer_reference

D, D_SAE = 40, 70


def group_of(sae) -> str:
    return f"{sae.kind}|{sae.weights_hash()}"


def write(table, row, sae, v, m):
    """Row := the steering (sae or None, v, m), as the vLLM worker state writes it."""
    if sae is None:
        table.write(row, const=m * v)
    else:
        p = prepare_sparse_steer(sae, v, m)
        table.write(row, const=p.const, prepared=p, group=group_of(sae))


def build(kind, rows_spec, width=64, n_rows=8):
    sae = random_sae(kind, d_in=D, d_sae=D_SAE, seed=7, k=9 if kind == "topk" else None)
    table = SteerTable(D, rows=n_rows, width=width)
    rows = {}
    for r, (what, support, sign, m, seed) in rows_spec.items():
        if what == "dense":
            v = torch.randn(D, generator=torch.Generator().manual_seed(seed))
            rows[r] = (None, v, m)
        else:
            rows[r] = (sae, random_latent(D_SAE, support, sign, seed=seed), m)
        write(table, r, *rows[r])
    return sae, table, rows


def tokens(T, n_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(T, D, generator=g), torch.randint(0, n_rows, (T,), generator=g)


SPEC = {
    1: ("yapo", 12, "mixed", 1.0, 1),
    2: ("yapo", 9, "neg", -2.0, 2),
    3: ("yapo", 6, "pos", 0.5, 3),
    4: ("dense", None, None, -1.5, 4),
    5: ("yapo", 12, "mixed", -1.0, 1),  # the same vector as row 1, the other way: shares its columns
}


@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("T", (1, 7, 33))
def test_matches_reference_mixed_rows(kind, T):
    sae, table, rows = build(kind, SPEC)
    h, slot = tokens(T, 6, seed=T)
    want = table_steer_reference(h, slot, rows)
    torch.testing.assert_close(table_steer(h, slot, table), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(table_steer(h, slot, table, width=table.used_width), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("m", (-2.0, -0.5, 0.0, 1.0, 3.0))
def test_every_multiplier_and_bfloat16(kind, m):
    spec = {1: ("yapo", 15, "mixed", m, 5), 2: ("dense", None, None, m, 6)}
    sae, table, rows = build(kind, spec)
    h, slot = tokens(11, 3, seed=2)
    torch.testing.assert_close(table_steer(h, slot, table), table_steer_reference(h, slot, rows), rtol=1e-5, atol=1e-4)
    hb = h.to(torch.bfloat16)
    got = table_steer(hb, slot, table)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), table_steer_reference(hb.float(), slot, rows), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_rewrite_and_clear_rows_free_columns(kind):
    sae, table, rows = build(kind, SPEC)
    h, slot = tokens(20, 6, seed=3)
    used = table.used_width
    table.clear(1)  # row 5 still uses the same latents: their columns stay
    assert table.used_width == used
    rows.pop(1)
    slot = torch.where(slot == 1, torch.zeros_like(slot), slot)
    torch.testing.assert_close(table_steer(h, slot, table), table_steer_reference(h, slot, rows), rtol=1e-5, atol=1e-4)
    for r in (2, 3, 5):
        table.clear(r)
    assert table.used_width == 0 and not table._col_of
    assert torch.isinf(table.thr).all() and not table.enc.any() and not table.dec.any()
    rows[2] = (sae, random_latent(D_SAE, 20, "neg", seed=9), 1.0)  # a new vector in a freed row
    write(table, 2, *rows[2])
    slot = torch.where(slot == 4, slot, torch.where(slot == 2, slot, torch.zeros_like(slot)))
    live = {r: rows[r] for r in (2, 4)}
    torch.testing.assert_close(table_steer(h, slot, table), table_steer_reference(h, slot, live), rtol=1e-5, atol=1e-4)


def test_full_table_and_second_sae_are_refused_by_name():
    sae, table, rows = build("jumprelu", {1: ("yapo", 10, "neg", 1.0, 1)}, width=10)
    with pytest.raises(YapoFastError, match="table of this layer is full"):
        write(table, 2, sae, random_latent(D_SAE, 10, "neg", seed=2), 1.0)
    other = random_sae("jumprelu", d_in=D, d_sae=D_SAE, seed=8)
    with pytest.raises(YapoFastError, match="one SAE at a time"):
        write(table, 3, other, random_latent(D_SAE, 3, "neg", seed=3), 1.0)
    with pytest.raises(YapoFastError, match="row 0 is unsteered"):
        table.write(0, const=torch.zeros(D))


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_compiles_fullgraph_once_while_tables_slots_and_multipliers_change(kind):
    """No graph break (fullgraph=True raises on one) and no recompilation (a counting backend)
    across new vectors, new multipliers, cleared rows and new slot maps of the same batch size."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.compiler.reset()
    sae, table, rows = build(kind, SPEC)
    counter = CompileCounterWithBackend("eager")
    step = torch.compile(lambda h, slot: table_steer(h, slot, table), fullgraph=True, backend=counter)
    h, slot = tokens(9, 6, seed=4)
    for change in range(4):
        if change == 1:  # a new vector and a new multiplier for an existing one
            rows[6] = (sae, random_latent(D_SAE, 8, "mixed", seed=11), 2.0)
            write(table, 6, *rows[6])
            rows[2] = (rows[2][0], rows[2][1], 0.75)
            write(table, 2, *rows[2])
        if change == 2:
            table.clear(3)
            rows.pop(3)
        slot = torch.randint(0, 7 if change else 6, (9,), generator=torch.Generator().manual_seed(change))
        slot = torch.where(slot == 3, torch.zeros_like(slot), slot)
        want = table_steer_reference(h, slot, rows)
        torch.testing.assert_close(step(h, slot), want, rtol=1e-5, atol=1e-4)
    assert counter.frame_count == 1


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_runs_on_meta_tensors(kind):
    sae, table, rows = build(kind, SPEC)
    meta = table.to("meta")
    h = torch.empty(13, D, device="meta", dtype=torch.bfloat16)
    slot = torch.empty(13, device="meta", dtype=torch.int64)
    out = table_steer(h, slot, meta)
    assert out.device.type == "meta" and out.shape == (13, D) and out.dtype == torch.bfloat16
