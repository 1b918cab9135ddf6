"""yapo_fast.train(...): YaPO, BiPO and CAA vectors from preference pairs (settings: TrainConfig;
the run itself: Trainer)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from yapo_fast.errors import YapoFastError
from yapo_fast.model import check_layer, model_identity
from yapo_fast.steering import Steering
from yapo_fast.train import distributed as ddp
from yapo_fast.train.cache import ExampleCache, assemble, build_cache, tokenize_pairs
from yapo_fast.train.checkpoint import load_checkpoint, save_checkpoint
from yapo_fast.train.config import TrainConfig, batch_schedule, make_optimizer
from yapo_fast.train.lean import DecoderRunner, forward_from_layer
from yapo_fast.train.objective import dpo_losses
from yapo_fast.train.sparsity import check_sparsity, sparsify_step_, support_at
from yapo_fast.vector import SteeringVector


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
        self.sae = None if sae is None else sae.to(device=runner.device, dtype=runner.dtype)

    def loss_sum(self, indices: list[int], v: torch.Tensor, d: int) -> torch.Tensor:
        """Sum over `indices` of the per-pair DPO losses (differentiable in v)."""
        return self.loss_sum_per_pair(indices, v, d).sum()

    def loss_sum_per_pair(self, indices: list[int], v: torch.Tensor, d: int) -> torch.Tensor:
        b = assemble(self.cache, indices, self.runner.device, self.pack_tokens)
        steering = Steering.trainable(v, d, sae=self.sae if self.cfg.method == "yapo" else None)
        hp = steering.steer_cached(b.hp.flatten(0, 1), b.codes_p).view_as(b.hp)
        hr = steering.steer_cached(b.hr.flatten(0, 1), b.codes_r).view_as(b.hr)
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
    from yapo_fast.data.pairs import load_pairs
    from yapo_fast.model import load_model
    from yapo_fast.sae.autoencoder import SAE, load_sae

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


class Trainer:
    """One YaPO or BiPO training run, step by step. `train()` is `Trainer(...).run()`; a caller that
    needs control between steps (a benchmark interleaving two trainers, a time-to-quality probe)
    calls `build_cache()` and then `step()` until `done`, and gets exactly the same run.

    The step loop is plain: for each (batch, d) of the seeded schedule, the lean forward from the
    cached layer-L states gives the policy log-probs, the cached reference log-probs give the DPO
    loss, autograd gives the gradient of v (all-reduced across processes), then clip, AdamW, the
    sparsity step if any, cosine schedule. Checkpoints, the JSONL loss log and the per-epoch vector
    files live beside `out`."""

    def __init__(self, cfg: TrainConfig, pairs, *, model, tokenizer, sae=None, out=None, resume=True, progress=True):
        self.cfg, self.pairs, self.model, self.sae, self.progress = cfg, pairs, model, sae, progress
        self.out, self.log_path, self.ckpt_path = _paths(out)
        self.ident = model_identity(model)
        self.rank, self.world = ddp.init_from_env(model.device)
        self.main = self.rank == 0
        self.runner = DecoderRunner(model)
        self.tokens = tokenize_pairs(tokenizer, pairs, cfg.system)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed + 7919)).tolist()
        n_hold = min(len(pairs) - 1, max(1, round(cfg.holdout * len(pairs)))) if cfg.holdout else 0
        self.held, self.train_ids = sorted(order[:n_hold]), sorted(order[n_hold:])
        self.schedule = [
            (e, [self.train_ids[i] for i in b], d)
            for e, b, d in batch_schedule(len(self.train_ids), cfg.batch_size, cfg.epochs, cfg.seed)
        ]
        size = sae.d_sae if cfg.method == "yapo" else model.config.hidden_size
        self.v = torch.zeros(size, dtype=self.runner.dtype, device=self.runner.device, requires_grad=True)
        self.opt, self.sched = make_optimizer(self.v, cfg, self.total)
        self.row_norms = sae.W_dec.norm(dim=1).to(self.v.device, self.v.dtype) if cfg.support is not None else None
        self.fingerprint = self._fingerprint()  # identity in the checkpoints; hashes all the data, so once
        self.next_step, self.stopped = 0, False
        if resume and self.ckpt_path is not None and self.ckpt_path.exists():
            self.next_step, self.stopped = load_checkpoint(
                self.ckpt_path, v=self.v, optimizer=self.opt, scheduler=self.sched, fingerprint=self.fingerprint
            )
        self.resumed_from = self.next_step
        records = _read_log(self.log_path, self.next_step)
        self.losses = [r for r in records if not r.get("eval")]
        self.evals = [r for r in records if r.get("eval")]
        if self.main and self.log_path is not None and not self.done:
            from yapo_fast.atomic import write_text_atomic

            self.log_path.parent.mkdir(parents=True, exist_ok=True)  # the log cut back to the checkpoint
            write_text_atomic(self.log_path, "".join(json.dumps(r) + "\n" for r in records))
        self.objective: LeanObjective | None = None
        self.cache_seconds = 0.0

    @property
    def total(self) -> int:
        return len(self.schedule)

    @property
    def done(self) -> bool:
        return self.next_step >= self.total or self.stopped

    def _fingerprint(self) -> str:
        cfg, sae = self.cfg, self.sae
        data = json.dumps([[t.prompt, t.chosen, t.rejected] for t in self.tokens]).encode()
        return cfg.fingerprint(
            data=hashlib.sha256(data).hexdigest()[:16],
            model=self.ident.get("fingerprint"),
            holdout=[self.held, cfg.patience],
            sae=None if sae is None else sae.weights_hash(),
            **({"sparsity": [cfg.support, cfg.l1]} if cfg.support is not None or cfg.l1 else {}),
        )

    def build_cache(self) -> None:
        """Layer-L states (and reference log-probs) of this process's pairs, once."""
        if self.objective is not None:
            return
        cfg, tc = self.cfg, time.perf_counter()
        mine = ddp.local_share(sorted(self.train_ids + self.held), self.rank, self.world)
        cache = build_cache(
            self.runner,
            self.tokens,
            mine,
            cfg.layer,
            sae=self.sae,
            batch_size=cfg.cache_batch_size,
            max_memory_bytes=cfg.cache_memory_bytes,
            progress=self.progress and self.main,
            pack_tokens=cfg.pack_tokens,
        )
        self.cache_seconds += time.perf_counter() - tc
        self.objective = LeanObjective(self.runner, cache, cfg, self.sae, cfg.pack_tokens)

    def vector(self) -> SteeringVector:
        cfg = self.cfg
        info = {
            **{k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "beta", "warmup_steps", "seed", "system")},
            "pairs": len(self.pairs),
            **({"support": cfg.support} if cfg.support is not None else {}),
            **({"l1": cfg.l1} if cfg.l1 else {}),
            "steps": self.total,
        }
        kw = dict(layer=cfg.layer, model=self.ident, multiplier=cfg.multiplier, info=info)
        if cfg.method == "yapo":
            return SteeringVector.from_latent(self.v.detach(), sae=self.sae, **kw)
        return SteeringVector.from_dense(self.v.detach(), method=cfg.method, **kw)

    def step(self) -> dict:
        """One optimizer step of the schedule (then, at an epoch end, the held-out evaluation and the
        epoch's vector file; a checkpoint when due). Returns the step's loss-log record."""
        if self.done:
            raise YapoFastError("the run is finished: no step left")
        self.build_cache()
        cfg, v, step = self.cfg, self.v, self.next_step
        epoch, batch, d = self.schedule[step]
        ts = time.perf_counter()
        self.opt.zero_grad(set_to_none=False)
        local = ddp.local_share(batch, self.rank, self.world)
        loss_sum = self.objective.loss_sum(local, v, d) if local else v.sum() * 0.0
        (loss_sum / len(batch)).backward()
        stats = torch.stack([loss_sum.detach().float().reshape(())]).to(v.device)
        ddp.all_reduce_sum(v.grad, self.world)
        ddp.all_reduce_sum(stats, self.world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_([v], cfg.grad_clip))
        if not (math.isfinite(grad_norm) and bool(torch.isfinite(stats).all())):
            # stop before AdamW writes NaN into v: the last checkpoint stays a good one
            raise YapoFastError(
                f"step {step + 1}: the loss or the gradient of v is NaN or inf (loss "
                f"{float(stats[0]) / len(batch)}, grad norm {grad_norm}); lower --lr or "
                "--beta, or check the data; the run resumes from its last checkpoint"
            )
        self.opt.step()
        lr_now = self.sched.get_last_lr()[0]
        if cfg.support is not None or cfg.l1:
            k_now = None if cfg.support is None else support_at(step + 1, self.total, cfg.support, v.numel())
            sparsify_step_(v, self.opt, support=k_now, l1=cfg.l1, lr=lr_now, row_norms=self.row_norms)
        self.sched.step()
        self.next_step = step + 1
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
        if self.main:
            self.losses.append(rec)
            self._log(rec)
        epoch_end = self.next_step == self.total or self.schedule[self.next_step][0] != epoch
        if epoch_end and self.held:
            self._evaluate_heldout(epoch)
        self._save(epoch, epoch_end)
        return rec

    def _log(self, rec: dict) -> None:
        if self.main and self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    def _evaluate_heldout(self, epoch: int) -> None:
        ev = self.objective.heldout(
            ddp.local_share(self.held, self.rank, self.world), self.v.detach(), self.cfg.batch_size
        )
        ev = ddp.all_reduce_sum(ev.to(self.v.device), self.world).cpu()
        rec = {
            "eval": True,
            "step": self.next_step,
            "epoch": epoch,
            "heldout_pairs": int(ev[0]),
            "heldout_accuracy": float(ev[1] / ev[0]),
            "heldout_loss": float(ev[2] / ev[0]),
        }
        self.evals.append(rec)  # every process: all take the same early-stopping decision
        self._log(rec)
        accs = [e["heldout_accuracy"] for e in self.evals]
        if self.cfg.patience is not None and len(accs) - 1 - accs.index(max(accs)) >= self.cfg.patience:
            self.stopped = True

    def _save(self, epoch: int, epoch_end: bool) -> None:
        if not (self.main and self.out is not None):
            return
        if epoch_end:
            vec = self.vector()
            vec.info["epoch"] = epoch + 1
            vec.save(self.out.with_suffix(f".epoch{epoch + 1}.safetensors"))
            vec.save(self.out)
        if epoch_end or self.next_step % self.cfg.checkpoint_every == 0:
            save_checkpoint(
                self.ckpt_path,
                v=self.v,
                optimizer=self.opt,
                scheduler=self.sched,
                step=self.next_step,
                fingerprint=self.fingerprint,
                stopped=self.stopped,
            )

    def run(self, callback=None) -> TrainResult:
        """Every remaining step; `callback(record)` after each (an exception stops the run)."""
        t0 = time.perf_counter()
        if not self.done:
            self.build_cache()
            desc = f"{self.cfg.method} layer {self.cfg.layer}"
            bar = tqdm(total=self.total, initial=self.next_step, desc=desc, disable=not (self.progress and self.main))
            try:
                while not self.done:
                    rec = self.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", d=rec["d"], nnz=rec["nnz"])
                    if callback is not None:
                        callback(rec)
            finally:
                bar.close()
            ddp.barrier(self.world)
        vec = self.vector()
        if self.main and self.out is not None and not self.out.exists():
            vec.save(self.out)
        return TrainResult(
            vector=vec,
            losses=self.losses,
            seconds=time.perf_counter() - t0,
            cache_seconds=self.cache_seconds,
            steps=self.total,
            resumed_from=self.resumed_from,
            out=self.out,
            log_path=self.log_path,
            evals=self.evals,
            stopped_early=self.stopped,
        )


@_weights_frozen
def train(
    method: str,
    pairs,
    *,
    model=None,
    tokenizer=None,
    sae=None,
    out=None,
    resume: bool = True,
    progress: bool = True,
    callback=None,
    **settings,
) -> TrainResult:
    """Train a steering vector.

    method: 'yapo' (sparse, in the SAE's latent space), 'bipo' (dense) or 'caa' (mean difference).
    pairs: a list of PreferencePair or a path (BiPO CSV or JSONL prompt/chosen/rejected).
    model/tokenizer: a transformers causal LM and its tokenizer, a path, or None (embedded default).
    sae: a yapo_fast.SAE, a sae-lens directory, or None (the shipped SAE); yapo only.
    out: the vector file (.safetensors); beside it <stem>.losses.jsonl (one line per step),
      <stem>.epoch<k>.safetensors (after every epoch) and <stem>.ckpt.safetensors (resume state).
    resume: continue from the checkpoint beside `out` when it belongs to the same run.
    callback: called with each step's record after the step (an exception stops the run).
    settings: any field of TrainConfig (layer, epochs, batch_size, lr, beta, warmup_steps,
      grad_clip, seed, system, multiplier, caa_reduce, holdout, patience, support, l1,
      checkpoint_every, cache_batch_size, cache_memory_bytes, pack_tokens), each documented there;
      the defaults are the paper's reference schedule.
    Under torchrun the pairs are split across processes and the gradient all-reduced.
    """
    t0 = time.perf_counter()
    cfg = TrainConfig.of(method, **settings)  # refuse bad settings before loading anything
    pairs, model, tokenizer, sae, layer = _resolve(method, pairs, model, tokenizer, sae, cfg.layer)
    check_sparsity(method, cfg.support, cfg.l1, getattr(sae, "d_sae", None))
    cfg = replace(cfg, layer=layer)
    if method == "caa":
        return _train_caa(cfg, pairs, model, tokenizer, out, progress, t0)
    return Trainer(
        cfg, pairs, model=model, tokenizer=tokenizer, sae=sae, out=out, resume=resume, progress=progress
    ).run(callback)


def _train_caa(cfg: TrainConfig, pairs, model, tokenizer, out, progress: bool, t0: float) -> TrainResult:
    from yapo_fast.train.caa import train_caa

    vec = train_caa(model, tokenizer, pairs, cfg.layer, reduce=cfg.caa_reduce, system=cfg.system, progress=progress)
    vec.multiplier = float(cfg.multiplier)
    out_path = _paths(out)[0]
    if out_path is not None:
        vec.save(out_path)
    seconds = time.perf_counter() - t0
    return TrainResult(vector=vec, seconds=seconds, cache_seconds=seconds, out=out_path)
