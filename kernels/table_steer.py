"""The graph-safe steering step: every token of a batch steered by its own row of a table.

A `SteerTable` holds, in fixed-capacity buffers allocated once, every steering prepared for one
layer (and one SAE): per row, the constant part of the edit (dense vectors: all of it) and the
coefficients a_i = m*v_i < 0 of the entries that depend on the token (kernels/sparse_steer_prepare.py
says why only those do); per column, the encoder column, folded bias, threshold and decoder row of
one such latent, shared by every row that uses it (the union of the rows' dependent supports).
Row 0 is "unsteered" (all zeros). Registering, replacing or removing a steering, or changing its
multiplier, only writes into these buffers (`write`, `clear`); they are never reallocated.

`table_steer(h, slot, table)` is then a fixed sequence of tensor ops whose shapes depend only on the
number of tokens: no host read of a tensor value, no data-dependent shape, no Python branch on a
tensor, so torch.compile(fullgraph=True) traces it once and a CUDA graph can replay it while the
tables and the per-token slot map change between replays. Exact: for token t with row r,

    h'_t = h_t + const[r] + sum_col max(coef[r, col], -z_t[col]) * dec[col]

where z_t[col] is the token's SAE code of that column's latent (0 where inactive) and coef is 0 at
the columns row r does not use, where max(0, -z) = 0 adds exactly nothing. Reference:
kernels/table_steer_reference.py (a per-token loop over the single-vector reference ops).
"""

from __future__ import annotations

import heapq
import math

import torch

from yapo_fast.errors import YapoFastError


class SteerTable:
    """Fixed-capacity steering buffers of one layer: `rows` steerings (row 0 unsteered) over at
    most `width` distinct dependent latents of one SAE (`group`: its kind, shape and weights)."""

    def __init__(self, d_model: int, *, rows: int, width: int, device="cpu", dtype=torch.float32):
        if rows < 2 or width < 0:
            raise YapoFastError(f"a steering table needs at least 2 rows and width >= 0, got {rows}, {width}")
        z = dict(device=device, dtype=dtype)
        self.d_model, self.rows, self.width = d_model, rows, width
        self.const = torch.zeros(rows, d_model, **z)
        self.coef = torch.zeros(rows, width, **z)
        self.enc = torch.zeros(d_model, width, **z)
        self.bias = torch.zeros(width, **z)
        self.thr = torch.full((width,), math.inf, **z)  # a free column is never active
        self.dec = torch.zeros(width, d_model, **z)
        self.latent = torch.zeros(width, dtype=torch.int64, device=device)  # column -> latent id (TopK gather)
        self.topk: tuple | None = None  # (W_enc (d_model, d_sae), folded b_enc (d_sae,), k) of a TopK SAE
        self.group: str | None = None  # the SAE the columns belong to (None: no sparse row yet)
        self._col_of: dict[int, int] = {}  # latent id -> column
        self._refs = [0] * width  # rows using each column
        self._free = list(range(width))  # a heap: the lowest free column first, so the used ones stay packed
        self._row_cols: dict[int, list[int]] = {}  # row -> its columns
        # columns up to the last one in use: an eager caller computes only those (read per layer
        # and step, so kept up to date here rather than derived)
        self.used_width = 0

    def write(self, row: int, *, const: torch.Tensor, prepared=None, group: str | None = None) -> None:
        """Row `row` := a steering: `const` (d_model,) added to every token, plus for a YaPO vector
        its dependent entries from `prepared` (a PreparedSteer of the SAE named by `group`)."""
        if not 0 < row < self.rows:
            raise YapoFastError(f"table row {row} out of range 1..{self.rows - 1} (row 0 is unsteered)")
        self.clear(row)
        self.const[row] = const.to(self.const)
        if prepared is None or prepared.coef.numel() == 0:
            return
        self._check_group(prepared, group)
        cols = [self._column(int(i), prepared, j) for j, i in enumerate(prepared.dep_indices.tolist())]
        self._row_cols[row] = cols
        self.coef[row, torch.tensor(cols, dtype=torch.int64, device=self.coef.device)] = prepared.coef.to(self.coef)

    def clear(self, row: int) -> None:
        """Row `row` := unsteered; columns no other row uses are freed."""
        self.const[row].zero_()
        self.coef[row].zero_()
        freed = False
        for col in self._row_cols.pop(row, []):
            self._refs[col] -= 1
            if self._refs[col] == 0:
                del self._col_of[int(self.latent[col])]
                heapq.heappush(self._free, col)
                self.thr[col] = math.inf
                self.enc[:, col].zero_()
                self.dec[col].zero_()
                self.bias[col] = 0.0
                freed = True
        if freed:
            self.used_width = max(self._col_of.values(), default=-1) + 1

    def _check_group(self, prepared, group: str | None) -> None:
        if self.group is None or not self._col_of:
            self.group = group
            if prepared.kind == "topk":
                self.topk = (prepared.topk_W_enc.to(self.enc), prepared.topk_b_enc.to(self.enc), int(prepared.k))
            else:
                self.topk = None
        elif group != self.group:
            raise YapoFastError(
                "one layer steers through one SAE at a time: this vector's SAE differs from the one the "
                "layer's other registered vectors use; unregister those, or steer this layer with one SAE"
            )

    def _column(self, latent: int, prepared, j: int) -> int:
        col = self._col_of.get(latent)
        if col is None:
            if not self._free:
                raise YapoFastError(
                    f"the steering table of this layer is full ({self.width} distinct dependent latents across "
                    "the registered vectors): unregister some vectors, or raise the width (YAPO_FAST_TABLE_WIDTH)"
                )
            col = self._col_of[latent] = heapq.heappop(self._free)
            self.used_width = max(self.used_width, col + 1)
            self.enc[:, col] = prepared.enc_cols[:, j].to(self.enc)
            self.bias[col] = prepared.enc_bias[j].to(self.bias)
            self.thr[col] = prepared.thresholds[j].to(self.thr)
            self.dec[col] = prepared.dec_rows[j].to(self.dec)
            self.latent[col] = latent
        self._refs[col] += 1
        return col

    def to(self, device) -> "SteerTable":
        """A copy on `device` (meta included: the step then runs without any value)."""
        out = SteerTable.__new__(SteerTable)
        out.__dict__.update(self.__dict__)
        for name in ("const", "coef", "enc", "bias", "thr", "dec", "latent"):
            setattr(out, name, getattr(self, name).to(device))
        if self.topk is not None:
            out.topk = (self.topk[0].to(device), self.topk[1].to(device), self.topk[2])
        out._refs, out._col_of, out._free = list(self._refs), dict(self._col_of), list(self._free)
        out._row_cols = {r: list(c) for r, c in self._row_cols.items()}
        return out


def table_steer(h: torch.Tensor, slot: torch.Tensor, table: SteerTable, *, width: int | None = None) -> torch.Tensor:
    """h (T, d_model) steered per token: token t by table row slot[t] (int64, 0 = unsteered).

    `width`: columns computed (default: all, the graph-safe choice; an eager caller may pass
    table.used_width). Computed in float32, returned in h's dtype."""
    w = table.width if width is None else width
    x = h.to(table.const.dtype)
    out = x + table.const[slot]
    if w == 0:
        return out.to(h.dtype)
    if table.topk is None:
        pre = torch.addmm(table.bias[:w], x, table.enc[:, :w])
        active = pre > table.thr[:w]
    else:  # the cut between the k-th and (k+1)-th largest pre-activation over all latents
        W, b, k = table.topk
        full = torch.addmm(b, x, W)
        best = torch.topk(full, min(k + 1, full.shape[1]), dim=1).values
        kth = best[:, k - 1 : k]
        nxt = best[:, k : k + 1] if k < full.shape[1] else torch.full_like(kth, -math.inf)
        cut = torch.where(torch.isinf(nxt), nxt, 0.5 * (kth + nxt))
        pre = full[:, table.latent[:w]]  # the same numbers the cut was taken over: ties stay ties
        active = (pre > table.thr[:w]) & (pre >= cut)
    z = torch.where(active, pre, torch.zeros_like(pre))
    c = torch.maximum(table.coef[slot, :w], -z)
    return torch.addmm(out, c, table.dec[:w]).to(h.dtype)
