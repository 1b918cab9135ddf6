"""yapo_fast.train(...): YaPO, BiPO and CAA vectors from preference pairs.

The step loop is plain: for each (batch, d) of the seeded schedule, the lean forward from the
cached layer-L states gives the policy log-probs, the cached reference log-probs give the DPO
loss, autograd gives the gradient of v (all-reduced across processes), then clip, AdamW, cosine
schedule. Checkpoints, the JSONL loss log and the per-epoch vector files live beside `out`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import YapoFastError, check_multiplier
from ..model import check_layer, model_identity
from ..vector import SteeringVector
from . import distributed as ddp
from .cache import ExampleCache, assemble, build_cache, tokenize_pairs
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, batch_schedule, make_optimizer
from .lean import DecoderRunner, forward_from_layer
from .objective import dpo_losses, yapo_delta
from .sparsity import check_sparsity, sparsify_step_, support_at


@dataclass
class TrainResult:
    vector: SteeringVector
    losses: list[dict] = field(default_factory=list)  # one record per optimizer step
    seconds: float = 0.0  # wall time of this call (cache + steps)
    cache_seconds: float = 0.0
    steps: int = 0  # optimizer steps of the whole schedule
    resumed_from: int = 0  # the step this call started at (0: fresh)
    evals: list[dict] = field(default_factory=list)  # held-out evaluation after each epoch (holdout > 0)
    stopped_early: bool = False
    out: Path | None = None
    log_path: Path | None = None


class LeanObjective:
    """The loss of a batch as a function of v, from the cached layer-L states (this process's pairs)."""

    def __init__(self, runner: DecoderRunner, cache: ExampleCache, cfg: TrainConfig, sae=None, pack_tokens: int = 256):
        self.runner, self.cache, self.cfg, self.pack_tokens = runner, cache, cfg, pack_tokens
        self.W_dec = None if sae is None else sae.W_dec.to(runner.device, runner.dtype)

    def loss_sum(self, indices: list[int], v: torch.Tensor, d: int) -> torch.Tensor:
        """Sum over `indices` of the per-pair DPO losses (differentiable in v)."""
        return self.loss_sum_per_pair(indices, v, d).sum()

    def loss_sum_per_pair(self, indices: list[int], v: torch.Tensor, d: int) -> torch.Tensor:
        b = assemble(self.cache, indices, self.runner.device, self.pack_tokens)
        G, lp, dm = b.hp.shape
        lr = b.hr.shape[1]
        if self.cfg.method == "yapo":
            hp = b.hp + yapo_delta(b.codes_p, G * lp, v, d, self.W_dec).reshape(G, lp, dm)
            hr = b.hr + yapo_delta(b.codes_r, G * lr, v, d, self.W_dec).reshape(G, lr, dm)
        else:  # bipo: h + m v at every position
            hp, hr = b.hp + d * v, b.hr + d * v
        policy = forward_from_layer(self.runner, self.cfg.layer + 1, hp, hr, b.layout, b.targets_first, b.targets_pred)
        return dpo_losses(policy.float(), b.ref, d, self.cfg.beta)

    @torch.no_grad()
    def heldout(self, indices: list[int], v: torch.Tensor, batch_size: int) -> torch.Tensor:
        """[pairs, correct, loss sum] at m=+1: a pair is correct when the steered model raises the
        chosen response's log-ratio above the rejected one's (DPO's implicit reward accuracy)."""
        out = torch.zeros(3, dtype=torch.float64)
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            losses = self.loss_sum_per_pair(batch, v, 1)
            out += torch.tensor([len(batch), float((losses < math.log(2)).sum()), float(losses.sum())])
        return out


def _resolve(method, pairs, model, tokenizer, sae, layer):
    from ..data import load_pairs
    from ..model import load_model
    from ..sae import SAE, load_sae

    if isinstance(pairs, (str, os.PathLike)):
        pairs = load_pairs(pairs)
    pairs = list(pairs)
    if not pairs:
        raise YapoFastError("no preference pairs to train on")
    if model is None or isinstance(model, (str, os.PathLike)):
        model, loaded_tok = load_model(model)
        tokenizer = tokenizer or loaded_tok
    if tokenizer is None:
        raise YapoFastError("a model object was given without its tokenizer: pass tokenizer=...")
    if method == "yapo" or (layer is None and sae is not None):
        sae = sae if isinstance(sae, SAE) else load_sae(sae)
    if layer is None:
        if sae is None or sae.layer is None:
            raise YapoFastError("no layer given and no SAE naming its layer: pass layer=... (--layer)")
        layer = sae.layer
    if method == "yapo":
        if sae.layer is not None and sae.layer != layer:
            raise YapoFastError(
                f"the SAE reads layer {sae.layer} but layer={layer} was asked: train at the SAE's layer"
            )
        if sae.d_in != model.config.hidden_size:
            raise YapoFastError(
                f"SAE {sae.name!r} reads d_in={sae.d_in} but the model has hidden size "
                f"{model.config.hidden_size}: use an SAE trained on this model"
            )
    check_layer(model, layer)
    return pairs, model, tokenizer, (sae if method == "yapo" else None), layer


def _paths(out):
    if out is None:
        return None, None, None
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(out.suffix + ".safetensors") if out.suffix else out.with_suffix(".safetensors")
    stem = out.with_suffix("")
    return out, Path(f"{stem}.losses.jsonl"), Path(f"{stem}.ckpt.safetensors")


def _read_log(path: Path | None, upto: int) -> list[dict]:
    records = []
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if rec.get("step", 0) <= upto:
                records.append(rec)
    return records


def _weights_frozen(train_fn):
    """Only v is trained: a caller's model whose weights require grad (transformers' default after
    from_pretrained) would otherwise make every backward also compute and accumulate weight
    gradients (about twice the step's backward work, and .grad left on the caller's model).
    Frozen for the call, restored after."""

    @functools.wraps(train_fn)
    def wrapper(method, pairs, *, model=None, **kwargs):
        params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else []
        for p in params:
            p.requires_grad_(False)
        try:
            return train_fn(method, pairs, model=model, **kwargs)
        finally:
            for p in params:
                p.requires_grad_(True)

    return wrapper


@_weights_frozen
def train(
    method: str,
    pairs,
    *,
    model=None,
    tokenizer=None,
    sae=None,
    layer: int | None = None,
    epochs: int = 1,
    batch_size: int = 4,
    lr: float = 5e-4,
    beta: float = 0.1,
    warmup_steps: int = 100,
    grad_clip: float = 1.0,
    seed: int = 0,
    system: str | None = None,
    out=None,
    resume: bool = True,
    checkpoint_every: int = 50,
    caa_reduce: str = "mean",
    multiplier: float = 1.0,
    cache_batch_size: int = 8,
    cache_memory_bytes: int | None = None,
    pack_tokens: int = 256,
    holdout: float = 0.0,
    patience: int | None = None,
    support: int | None = None,
    l1: float = 0.0,
    progress: bool = True,
    callback=None,
) -> TrainResult:
    """Train a steering vector.

    method: 'yapo' (sparse, in the SAE's latent space), 'bipo' (dense) or 'caa' (mean difference).
    pairs: a list of PreferencePair or a path (BiPO CSV or JSONL prompt/chosen/rejected).
    model/tokenizer: a transformers causal LM and its tokenizer, a path, or None (embedded default).
    sae: a yapo_fast.SAE, a sae-lens directory, or None (the shipped SAE); yapo only.
    layer: the decoder layer whose output is steered (default: the SAE's layer).
    out: the vector file (.safetensors); beside it <stem>.losses.jsonl (one line per step),
      <stem>.epoch<k>.safetensors (after every epoch) and <stem>.ckpt.safetensors (resume state).
    resume: continue from the checkpoint beside `out` when it belongs to the same run.
    cache_memory_bytes: bound on the in-memory layer-L cache; beyond it pairs are spilled to disk.
    pack_tokens: sequences of a batch are packed into rows of about this many tokens (no padding
      between them; attention cost grows with the square of a row's length).
    holdout: fraction of the pairs (seeded split) held out; after every epoch the held-out preference
      accuracy at m=+1 is measured (TrainResult.evals, and the loss log).
    patience: with holdout, stop early after this many epochs without a better held-out accuracy
      (off by default: the full schedule runs).
    support: yapo: keep at most this many non-zero entries of v (the largest by effect
      |v_i| * ||W_dec[i]||), projected after every optimizer step, the budget falling from d_sae to
      `support` over the first half of the steps (gradual pruning; train/sparsity.py).
    l1: yapo: L1 strength, applied as a proximal soft threshold lr * l1 after every step.
    callback: called with each step's record after the step (an exception stops the run).
    Under torchrun the pairs are split across processes and the gradient all-reduced.
    """
    t0 = time.perf_counter()
    multiplier = check_multiplier(multiplier, "the vector's default multiplier")  # refuse before hours of training
    check_sparsity(method, support, l1, None)
    pairs, model, tokenizer, sae, layer = _resolve(method, pairs, model, tokenizer, sae, layer)
    check_sparsity(method, support, l1, getattr(sae, "d_sae", None))
    cfg = TrainConfig(
        method=method,
        layer=layer,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        beta=beta,
        warmup_steps=warmup_steps,
        grad_clip=grad_clip,
        seed=seed,
        system=system,
        checkpoint_every=checkpoint_every,
        caa_reduce=caa_reduce,
    ).validate()
    out_path, log_path, ckpt_path = _paths(out)
    ident = model_identity(model)
    info = {
        "pairs": len(pairs),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "beta": beta,
        "warmup_steps": warmup_steps,
        "seed": seed,
        "system": system,
        **({"support": support} if support is not None else {}),
        **({"l1": l1} if l1 else {}),
    }
    if method == "caa":
        from ..caa import train_caa

        vec = train_caa(model, tokenizer, pairs, layer, reduce=caa_reduce, system=system, progress=progress)
        vec.multiplier = float(multiplier)
        if out_path is not None:
            vec.save(out_path)
        seconds = time.perf_counter() - t0
        return TrainResult(vector=vec, seconds=seconds, cache_seconds=seconds, out=out_path)

    rank, world = ddp.init_from_env(model.device)
    main = rank == 0
    runner = DecoderRunner(model)
    tokens = tokenize_pairs(tokenizer, pairs, system)
    data_hash = (
        __import__("hashlib")
        .sha256(json.dumps([[t.prompt, t.chosen, t.rejected] for t in tokens]).encode())
        .hexdigest()[:16]
    )
    if not (isinstance(holdout, (int, float)) and 0 <= holdout < 1):
        raise YapoFastError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    if patience is not None and (not holdout or not isinstance(patience, int) or patience < 1):
        raise YapoFastError("patience (early stopping) needs holdout > 0 and a positive integer patience")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    n_hold = min(len(pairs) - 1, max(1, round(holdout * len(pairs)))) if holdout else 0
    held, train_ids = sorted(order[:n_hold]), sorted(order[n_hold:])
    schedule = [
        (e, [train_ids[i] for i in b], d) for e, b, d in batch_schedule(len(train_ids), batch_size, epochs, seed)
    ]
    total = len(schedule)
    fingerprint = cfg.fingerprint(
        data=data_hash,
        model=ident.get("fingerprint"),
        holdout=[held, patience],
        sae=None if sae is None else sae.weights_hash(),
        **({"sparsity": [support, l1]} if support is not None or l1 else {}),  # dense runs keep their id
    )

    size = sae.d_sae if method == "yapo" else model.config.hidden_size
    v = torch.zeros(size, dtype=runner.dtype, device=runner.device, requires_grad=True)
    opt, sched = make_optimizer(v, cfg, total)
    row_norms = sae.W_dec.norm(dim=1).to(v.device, v.dtype) if support is not None else None
    start, stopped = 0, False
    if resume and ckpt_path is not None and ckpt_path.exists():
        start, stopped = load_checkpoint(ckpt_path, v=v, optimizer=opt, scheduler=sched, fingerprint=fingerprint)
    records = _read_log(log_path, start)
    losses = [r for r in records if not r.get("eval")]
    evals = [r for r in records if r.get("eval")]

    def vector_now() -> SteeringVector:
        run_info = {**info, "steps": total}
        if method == "yapo":
            return SteeringVector.from_latent(
                v.detach(), layer=layer, sae=sae, model=ident, multiplier=multiplier, info=run_info
            )
        return SteeringVector.from_dense(
            v.detach(), method=method, layer=layer, model=ident, multiplier=multiplier, info=run_info
        )

    cache_seconds = 0.0
    if start < total and not stopped:
        tc = time.perf_counter()
        mine = ddp.local_share(sorted(train_ids + held), rank, world)
        cache = build_cache(
            runner,
            tokens,
            mine,
            layer,
            sae=sae,
            batch_size=cache_batch_size,
            max_memory_bytes=cache_memory_bytes,
            progress=progress and main,
            pack_tokens=pack_tokens,
        )
        cache_seconds = time.perf_counter() - tc
        objective = LeanObjective(runner, cache, cfg, sae, pack_tokens)
        if main and log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            from ..atomic import write_text_atomic

            write_text_atomic(log_path, "".join(json.dumps(r) + "\n" for r in records))
        log_file = log_path.open("a") if (main and log_path is not None) else None
        bar = tqdm(total=total, initial=start, desc=f"{method} layer {layer}", disable=not (progress and main))
        try:
            for step in range(start, total):
                epoch, batch, d = schedule[step]
                ts = time.perf_counter()
                opt.zero_grad(set_to_none=False)
                local = ddp.local_share(batch, rank, world)
                loss_sum = objective.loss_sum(local, v, d) if local else v.sum() * 0.0
                (loss_sum / len(batch)).backward()
                stats = torch.stack([loss_sum.detach().float().reshape(())]).to(v.device)
                ddp.all_reduce_sum(v.grad, world)
                ddp.all_reduce_sum(stats, world)
                grad_norm = float(torch.nn.utils.clip_grad_norm_([v], grad_clip))
                if not (math.isfinite(grad_norm) and bool(torch.isfinite(stats).all())):
                    # stop before AdamW writes NaN into v: the last checkpoint stays a good one
                    raise YapoFastError(
                        f"step {step + 1}: the loss or the gradient of v is NaN or inf (loss "
                        f"{float(stats[0]) / len(batch)}, grad norm {grad_norm}); lower --lr or "
                        "--beta, or check the data; the run resumes from its last checkpoint"
                    )
                opt.step()
                lr_now = sched.get_last_lr()[0]
                if support is not None or l1:
                    k_now = None if support is None else support_at(step + 1, total, support, v.numel())
                    sparsify_step_(v, opt, support=k_now, l1=l1, lr=lr_now, row_norms=row_norms)
                sched.step()
                rec = {
                    "step": step + 1,
                    "epoch": epoch,
                    "d": d,
                    "loss": float(stats[0]) / len(batch),
                    "grad_norm": grad_norm,
                    "lr": lr_now,
                    "nnz": int(torch.count_nonzero(v.detach())),
                    "seconds": time.perf_counter() - ts,
                }
                if main:
                    losses.append(rec)
                    if log_file is not None:
                        log_file.write(json.dumps(rec) + "\n")
                        log_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", d=d, nnz=rec["nnz"])
                epoch_end = step + 1 == total or schedule[step + 1][0] != epoch
                if epoch_end and held:
                    ev = objective.heldout(ddp.local_share(held, rank, world), v.detach(), batch_size)
                    ev = ddp.all_reduce_sum(ev.to(v.device), world).cpu()
                    evals.append(
                        {
                            "eval": True,
                            "step": step + 1,
                            "epoch": epoch,
                            "heldout_pairs": int(ev[0]),
                            "heldout_accuracy": float(ev[1] / ev[0]),
                            "heldout_loss": float(ev[2] / ev[0]),
                        }
                    )
                    if main and log_file is not None:
                        log_file.write(json.dumps(evals[-1]) + "\n")
                        log_file.flush()
                    accs = [e["heldout_accuracy"] for e in evals]
                    if patience is not None and len(accs) - 1 - accs.index(max(accs)) >= patience:
                        stopped = True
                if main and out_path is not None:
                    if epoch_end:
                        vec = vector_now()
                        vec.info["epoch"] = epoch + 1
                        vec.save(out_path.with_suffix(f".epoch{epoch + 1}.safetensors"))
                        vec.save(out_path)
                    if epoch_end or (step + 1) % checkpoint_every == 0:
                        save_checkpoint(
                            ckpt_path,
                            v=v,
                            optimizer=opt,
                            scheduler=sched,
                            step=step + 1,
                            fingerprint=fingerprint,
                            stopped=stopped,
                        )
                if callback is not None:
                    callback(rec)
                if stopped:
                    break
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        ddp.barrier(world)
    vec = vector_now()
    if main and out_path is not None and not out_path.exists():
        vec.save(out_path)
    return TrainResult(
        vector=vec,
        losses=losses,
        seconds=time.perf_counter() - t0,
        cache_seconds=cache_seconds,
        steps=total,
        resumed_from=start,
        out=out_path,
        log_path=log_path,
        evals=evals,
        stopped_early=stopped,
    )
