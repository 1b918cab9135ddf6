"""`yapo-fast sae train`: residual-stream activations -> an SAE trained by sae-lens's own trainer.

Pipeline (every stage resumable after a kill, every write atomic):

1. text:        yapo_fast.data.text_source (corpus + chat with the model's own answers, a mixture).
2. activations: the OUTPUT of decoder layer L, via a transformers forward hook; the forward pass
   stops at layer L (later layers and the LM head would be wasted work). Position 0 of each
   sequence and padding are dropped. Stored as float32 chunks in <work>/activations/, so a second
   SAE (other kind or width) on the same model/layer/text reuses them.
3. training:    sae_lens.training.sae_trainer.SAETrainer with sae-lens's training SAE classes
   (JumpReLU or TopK) fed by ActivationBatches, a seeded, position-addressable iterator over the
   cached activations: a checkpoint records how many samples were drawn, so a resumed run continues
   with exactly the batches it would have seen.
4. output:      the sae-lens inference SAE (normalisation folded in), in sae-lens's on-disk format,
   cast to --dtype, with our metadata (model, layer, kind, text mixture, command, seed).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from yapo_fast.atomic import atomic_dir, atomic_path, write_text_atomic
from yapo_fast.errors import YapoFastError

TRAIN_KINDS = ("jumprelu", "topk")
CHUNK_SEQUENCES = 16  # sequences per activation chunk file (the unit of resumable collection)


class _StopForward(Exception):
    """Raised by the capture hook: nothing after layer L is needed."""


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def layer_activations(model, layers: "int | list[int]", batch: list[list[int]], pad_id: int):
    """Decoder layer outputs for token sequences (right-padded together), as (n_tokens, d_model)
    float32 with padding and position 0 of every sequence dropped; a dict for a list of layers."""
    from yapo_fast.model import check_layer, decoder_layers

    wanted = [layers] if isinstance(layers, int) else list(layers)
    for layer in wanted:
        check_layer(model, layer)
    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    seen: dict[int, torch.Tensor] = {}
    last = max(wanted)

    def make_hook(layer):
        def hook(_module, _inputs, output):
            seen[layer] = (output if isinstance(output, torch.Tensor) else output[0]).detach()
            if layer == last:
                raise _StopForward

        return hook

    blocks = decoder_layers(model)
    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in wanted]
    try:
        model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    keep = mask.bool().clone()
    keep[:, 0] = False
    out = {layer: seen[layer][keep.to(seen[layer].device)].float().cpu() for layer in wanted}
    return out[layers] if isinstance(layers, int) else out


def collect_activations(
    model,
    cache_dirs: dict[int, Path],
    sequences: list[list[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, list[Path]]:
    """Activations of `sequences` at each layer of `cache_dirs` (layer -> directory), in chunk files;
    one forward serves all layers. Existing chunks are kept: the sequence list is deterministic,
    so chunk i always holds the same sequences."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    n_chunks = math.ceil(len(sequences) / CHUNK_SEQUENCES)
    # the name carries the chunk's sequence count: a shorter run's partial last chunk is another file
    sizes = [len(sequences[i * CHUNK_SEQUENCES : (i + 1) * CHUNK_SEQUENCES]) for i in range(n_chunks)]
    paths = {
        layer: [d / f"chunk_{i:05d}_{sizes[i]}.safetensors" for i in range(n_chunks)] for layer, d in cache_dirs.items()
    }
    done = [all(paths[layer][i].exists() for layer in paths) for i in range(n_chunks)]
    todo_tokens = sum(
        len(s) - 1
        for i in range(n_chunks)
        if not done[i]
        for s in sequences[i * CHUNK_SEQUENCES : (i + 1) * CHUNK_SEQUENCES]
    )
    layers = sorted(cache_dirs)
    with tqdm(
        total=todo_tokens,
        desc=f"activations L{','.join(map(str, layers))}",
        unit="tok",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        for i in range(n_chunks):
            if done[i]:
                continue
            chunk = sequences[i * CHUNK_SEQUENCES : (i + 1) * CHUNK_SEQUENCES]
            parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
            # similar lengths together: less padding
            order = sorted(range(len(chunk)), key=lambda j: len(chunk[j]))
            for b in range(0, len(order), batch_size):
                batch = [chunk[j] for j in order[b : b + batch_size]]
                for layer, acts in layer_activations(model, layers, batch, pad_id).items():
                    parts[layer].append(acts)
                bar.update(sum(len(s) - 1 for s in batch))
            for layer in layers:
                paths[layer][i].parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(paths[layer][i]) as tmp:
                    save_file({"acts": torch.cat(parts[layer]).contiguous()}, str(tmp))
    return paths


def load_activation_chunks(paths: list[Path]) -> torch.Tensor:
    from safetensors.torch import load_file

    return torch.cat([load_file(str(p))["acts"] for p in paths])


class ActivationBatches:
    """Endless batches over a fixed activation tensor: epoch e visits every row once in a
    permutation seeded by (seed, e). `position` (samples drawn so far) fully determines the
    next batch, so a resumed run sets it and draws exactly what the killed run would have."""

    def __init__(self, acts: torch.Tensor, batch_size: int, seed: int, position: int = 0):
        if len(acts) < batch_size:
            raise YapoFastError(
                f"only {len(acts)} activation rows for a batch of {batch_size}: raise the token "
                "budget (--tokens) or lower --batch-size"
            )
        self.acts, self.batch_size, self.seed, self.position = acts, batch_size, seed, position
        self._perm_epoch, self._perm = -1, None

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.acts), generator=g), epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        n = len(self.acts)
        rows = []
        pos, need = self.position, self.batch_size
        while need:
            epoch, offset = divmod(pos, n)
            take = min(need, n - offset)
            rows.append(self._perm_of(epoch)[offset : offset + take])
            pos, need = pos + take, need - take
        self.position = pos
        return self.acts[torch.cat(rows)]


# ---------------------------------------------------------------------------------------------
# training (sae-lens)
# ---------------------------------------------------------------------------------------------
def _training_sae(
    kind: str,
    d_in: int,
    d_sae: int,
    *,
    k: int | None,
    target_l0: float,
    l0_coefficient: float,
    l0_warm_up_steps: int,
    init_threshold: float,
    pre_act_loss: float,
    aux_loss: float,
    decoder_init_norm: float,
    metadata: dict,
):
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common = dict(
        d_in=d_in,
        d_sae=d_sae,
        dtype="float32",
        device="cpu",
        apply_b_dec_to_input=True,
        normalize_activations="expected_average_only_in",
        decoder_init_norm=decoder_init_norm,
    )
    if kind == "jumprelu":
        # GemmaScope-2's quadratic L0 penalty pulls L0 towards target_l0 (no coefficient sweep);
        # Anthropic's pre-activation loss pushes latents that have not fired for dead_feature_window
        # steps back towards their threshold (sae-lens applies it to dead latents only)
        cfg = JumpReLUTrainingSAEConfig(
            **common,
            jumprelu_sparsity_loss_mode="quadratic",
            target_l0=target_l0,
            l0_coefficient=l0_coefficient,
            l0_warm_up_steps=l0_warm_up_steps,
            jumprelu_init_threshold=init_threshold,
            pre_act_loss_coefficient=pre_act_loss or None,
        )
        sae = JumpReLUTrainingSAE(cfg)
    elif kind == "topk":
        if not k:
            raise YapoFastError("a topk SAE needs --k (active latents per token), e.g. --k 32")
        # AuxK: dead latents learn to reconstruct the live latents' residual (sae-lens's aux loss)
        cfg = TopKTrainingSAEConfig(**common, k=k, aux_loss_coefficient=aux_loss)
        sae = TopKTrainingSAE(cfg)
    else:
        raise YapoFastError(f"unknown SAE kind {kind!r} for training; use one of {TRAIN_KINDS}")
    for key, value in metadata.items():
        sae.cfg.metadata[key] = value
    return sae


def train_on_activations(
    acts: torch.Tensor,
    *,
    kind: str,
    d_sae: int,
    k: int | None = None,
    target_l0: float = 64,
    l0_coefficient: float = 1.0,
    init_threshold: float = 0.1,
    total_samples: int,
    batch_size: int = 1024,
    lr: float = 1e-3,
    pre_act_loss: float = 3e-6,
    aux_loss: float = 1.0,
    decoder_init_norm: float = 0.1,
    dead_window: int | None = None,
    seed: int = 0,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int | None = None,
    metadata: dict | None = None,
    progress: bool = False,
    log=None,
):
    """Train with sae-lens's SAETrainer on rows of `acts`; return the yapo_fast SAE (float32).
    With checkpoint_dir, a checkpoint there is resumed and new ones are written atomically.
    dead_window: samples without firing after which a latent counts as dead for the pre-activation
    loss (jumprelu) and AuxK (topk); default a quarter of the run."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from yapo_fast.integrations.sae_lens_loading import from_sae_lens

    torch.manual_seed(seed)
    steps = total_samples // batch_size
    sae = _training_sae(
        kind,
        acts.shape[1],
        d_sae,
        k=k,
        target_l0=target_l0,
        l0_coefficient=l0_coefficient,
        l0_warm_up_steps=max(1, steps // 10),
        init_threshold=init_threshold,
        pre_act_loss=pre_act_loss,
        aux_loss=aux_loss,
        decoder_init_norm=decoder_init_norm,
        metadata=metadata or {},
    )
    dead_steps = max(10, steps // 4) if dead_window is None else max(1, dead_window // batch_size)
    n_ckpt = 0 if not (checkpoint_dir and checkpoint_every) else max(0, total_samples // checkpoint_every - 1)
    cfg = SAETrainerConfig(
        total_training_samples=total_samples,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=max(1, steps // 20),
        lr_decay_steps=0,
        lr_end=lr / 10,
        device="cpu",
        dead_feature_window=dead_steps,
        feature_sampling_window=max(10, steps // 4),
        n_checkpoints=n_ckpt,
        n_batches_for_norm_estimate=min(50, max(1, len(acts) // batch_size)),
    )
    provider = ActivationBatches(acts, batch_size, seed)
    trainer_box = {}
    # what a checkpoint must agree on to be resumed (the schedule and data order depend on it)
    run_config = {
        "kind": kind,
        "d_in": acts.shape[1],
        "d_sae": d_sae,
        "k": k,
        "target_l0": target_l0,
        "l0_coefficient": l0_coefficient,
        "total_samples": total_samples,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "rows": len(acts),
        "pre_act_loss": pre_act_loss,
        "aux_loss": aux_loss,
        "decoder_init_norm": decoder_init_norm,
        "dead_steps": dead_steps,
    }

    def save_checkpoint(checkpoint_path=None):
        trainer = trainer_box["t"]
        with atomic_dir(checkpoint_dir / "latest") as tmp:
            trainer.sae.save_model(str(tmp))
            trainer.save_trainer_state(tmp)
            # the trainer bumps n_training_steps only after checkpointing a step: count it here
            (tmp / "yapo_fast_resume.json").write_text(
                json.dumps(
                    {
                        "provider_position": provider.position,
                        "n_training_steps": trainer.n_training_steps + 1,
                        "n_training_samples": trainer.n_training_samples,
                        "config": run_config,
                    }
                )
            )

    trainer = SAETrainer(
        cfg=cfg, sae=sae, data_provider=provider, save_checkpoint_fn=save_checkpoint if checkpoint_dir else None
    )
    trainer_box["t"] = trainer
    # sae-lens moves its bar every 100 steps; short CPU runs want every step (the bar counts
    # samples, i.e. tokens, so its rate is tokens/s)
    trainer._update_pbar = lambda out, pbar: SAETrainer._update_pbar(trainer, out, pbar, update_interval=1)
    latest = checkpoint_dir / "latest" if checkpoint_dir else None
    if latest is not None and (latest / "yapo_fast_resume.json").exists():
        from safetensors.torch import load_file

        try:
            state = json.loads((latest / "yapo_fast_resume.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise YapoFastError(
                f"the checkpoint in {latest} is unreadable ({exc}); delete {checkpoint_dir} to start afresh"
            ) from None
        if not isinstance(state, dict) or state.get("config") != run_config:
            theirs = state.get("config") if isinstance(state, dict) else state
            raise YapoFastError(
                f"the checkpoint in {latest} belongs to another run ({theirs}); this run "
                f"is {run_config}. Resume with the same options, or delete {checkpoint_dir} "
                "(or pass another --work-dir) to start afresh"
            )
        try:
            sae.load_state_dict(load_file(str(latest / "sae_weights.safetensors")))
            # sae-lens keeps its optimizer state in a torch.save file; torch.load reads it with
            # weights_only=True (plain tensors and containers; a pickle naming code is refused)
            trainer.load_trainer_state(latest)
        except Exception as exc:
            raise YapoFastError(
                f"the checkpoint in {latest} is unreadable ({type(exc).__name__}: {exc}); delete "
                f"{checkpoint_dir} (or pass another --work-dir) to start afresh"
            ) from exc
        trainer.n_training_steps = state["n_training_steps"]
        provider.position = state["provider_position"]
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
        if log:
            log(f"resuming from checkpoint {latest}: {trainer.n_training_samples} of {total_samples} samples done")
    else:
        # fresh run: estimate the norm scale on the cached rows (not on batches drawn from the
        # provider, which would shift the stream) and start b_dec at the (scaled) mean activation,
        # which short runs otherwise spend their first hundreds of steps learning
        # a seeded sample of rows (the cache is ordered by source)
        sample = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed))[:65536]]
        scale = float(acts.shape[1] ** 0.5 / sample.norm(dim=-1).mean())
        trainer.activation_scaler.scaling_factor = scale
        with torch.no_grad():
            sae.b_dec.copy_(sample.mean(0) * scale)
    trained = trainer.fit()

    # the inference SAE, normalisation folded in (fit() already folded it into the weights)
    trained.eval()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        from sae_lens import SAE as SaeLensSAE

        loaded = SaeLensSAE.load_from_disk(tmp)
        rescaled = getattr(loaded.cfg, "rescale_acts_by_decoder_norm", False)
        if kind != "topk" or rescaled:
            # Unit-norm decoder rows (sae-lens's fold: W_enc, b_enc and the JumpReLU threshold
            # scaled by the row norm, W_dec divided by it; the SAE computes the same function).
            # Then a latent's value is the length of its edit in the residual stream and every
            # entry of a steering vector moves h equally per unit, as with Gemma Scope's SAEs
            # that YaPO's learning rate was set for; unfolded rows here span 1.6-14 (median 5.5).
            # A TopK SAE is folded only when it ranks by z*|W_dec| (rescale flag): otherwise
            # rescaling latents would change which k win.
            loaded.fold_W_dec_norm()
            loaded.cfg.rescale_acts_by_decoder_norm = False
        out = from_sae_lens(loaded)
        # recorded as measured (sae-lens's TopK trainer keeps its decoder rows at unit norm itself)
        norms = out.W_dec.norm(dim=1)
        out.metadata["W_dec_rows_unit_norm"] = bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3))
    return out


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
ANSWERED_PROMPTS = 16  # prompts a non-default model answers itself for the chat source


def chat_answers_for(model, tokenizer, model_arg, work_dir: Path, split: str = "train", progress: bool = True) -> dict:
    """The model's own answers to chat prompts: the shipped file for the default model (used as is),
    generated once and cached in the work dir for any other model."""
    from yapo_fast.data.text_source import SHIPPED_ANSWERS, interleaved_chat_prompts, load_answers, write_answers

    path = chat_answers_path(model_arg, work_dir)
    if path == SHIPPED_ANSWERS:
        return load_answers(SHIPPED_ANSWERS)
    prompts = interleaved_chat_prompts(split)[:ANSWERED_PROMPTS]
    answers = load_answers(path)
    if any(p not in answers for p in prompts):
        answers = write_answers(model, tokenizer, prompts, path, progress=progress)
    return answers


def chat_answers_path(model_arg, work_dir: Path) -> Path:
    """Where a model's own chat answers live: shipped for the default model, else in the work dir."""
    from yapo_fast.data.text_source import SHIPPED_ANSWERS
    from yapo_fast.model import DEFAULT_MODEL

    return SHIPPED_ANSWERS if model_arg in (None, "default", DEFAULT_MODEL) else Path(work_dir) / "chat_answers.jsonl"


def _answers_record(answers: dict[str, str], path: Path) -> dict:
    """What the metadata says about the answers the chat source used (file, count, content hash)."""
    import hashlib

    from yapo_fast.data.text_source import chat_prompts

    used = sorted((p, answers[p]) for p in chat_prompts("train") if p in answers)
    try:
        shown = str(path.relative_to(Path(__file__).resolve().parents[1]))  # yapo_fast/<...> for the shipped file
    except ValueError:
        shown = str(path)
    return {
        "file": shown,
        "prompts_answered": len(used),
        "sha256_of_used": hashlib.sha256(json.dumps(used).encode()).hexdigest()[:16],
    }


def _digest(sequences: list[list[int]]) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in sequences:
        h.update(torch.tensor(s, dtype=torch.int64).numpy().tobytes() + b"|")
    return h.hexdigest()[:12]


def run_train(args) -> Path:
    from yapo_fast.data.text_source import TextMixture, mixture_counts, source_pools
    from yapo_fast.data.text_source import text_stats as make_text_stats
    from yapo_fast.integrations.sae_lens_loading import save_sae
    from yapo_fast.model import DEFAULT_MODEL, check_layer, load_model, model_identity

    log = lambda msg: print(f"[sae train] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if args.kind not in TRAIN_KINDS:
        raise YapoFastError(f"--kind {args.kind!r}: yapo-fast trains {TRAIN_KINDS} SAEs")
    if args.tokens < args.batch_size:
        raise YapoFastError(f"--tokens {args.tokens} is below one batch (--batch-size {args.batch_size})")
    if args.threads < 1:
        raise YapoFastError(f"--threads {args.threads}: need at least 1")
    # one thread by default: on a shared 2-core machine two OpenMP threads contend with other jobs
    # and a step took 4x longer than with one (docs/sae.md)
    torch.set_num_threads(args.threads)
    mixture = TextMixture.parse(args.mix)
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    check_layer(model, args.layer)
    ident = model_identity(model)
    d_model = ident["d_model"]
    d_sae = args.width or 8 * d_model
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.parent / f".{out.name}.work"
    # activations depend on model, layer, text source, context and seed, not on the SAE: share them
    act_root = Path(args.activations_dir) if args.activations_dir else work / "activations"
    t0 = time.time()
    answers = chat_answers_for(model, tok, args.model, work) if mixture.chat > 0 else None
    # each source's pool in its own seeded order; the budget takes a prefix of every pool, so a
    # per-source cache serves runs with other budgets and mixtures
    pools = source_pools(tok, split="train", mixture=mixture, ctx=args.ctx, seed=args.seed, chat_answers=answers)
    order, used = mixture_counts(pools, mixture, args.tokens)
    text_stats = make_text_stats(pools, mixture, "train", args.ctx, order, used)
    extra = (
        sorted({int(x) for x in args.cache_layers.split(",") if x.strip()} - {args.layer}) if args.cache_layers else []
    )
    for layer in extra:
        check_layer(model, layer)
    parts = []
    for source, pool in pools.items():
        taken = text_stats["sequences_by_source"][source]
        if not taken:
            continue
        # the cache is keyed by everything that decides its rows, the pool's exact token sequences included
        key = f"{source}-ctx{args.ctx}-s{args.seed}-{_digest(pool)}"
        cache_dirs = {layer: act_root / f"{ident['fingerprint']}-L{layer}-{key}" for layer in [args.layer, *extra]}
        chunks = collect_activations(
            model,
            cache_dirs,
            pool[:taken],
            pad_id=tok.pad_token_id,
            batch_size=args.forward_batch,
            progress=not args.quiet,
        )
        parts.append(load_activation_chunks(chunks[args.layer]))
    if args.collect_only:
        log(
            f"collected {sum(len(p) for p in parts)} activation rows of layer {args.layer} "
            f"({text_stats['tokens_by_source']}) in {time.time() - t0:.0f}s; --collect-only: no training"
        )
        return act_root
    acts = torch.cat(parts)
    del parts
    log(
        f"{len(acts)} activation rows of layer {args.layer} ({time.time() - t0:.0f}s); training {args.kind} "
        f"width {d_sae} on {args.samples or len(acts)} samples"
    )
    meta = {
        "model_name": DEFAULT_MODEL if ident["name"] == DEFAULT_MODEL else ident["name"],
        "model_fingerprint": ident["fingerprint"],
        "hook_name": f"blocks.{args.layer}.hook_resid_post",
        "hook_layer": args.layer,
        "yapo_fast_kind": args.kind,
        "text_mixture": str(mixture),
        "text_stats": text_stats,
        **(
            {"chat_answers": _answers_record(answers, chat_answers_path(args.model, work))}
            if answers is not None
            else {}
        ),
        "train": {
            "seed": args.seed,
            "tokens": len(acts),
            "samples": args.samples or len(acts),
            "batch_size": args.batch_size,
            "lr": args.lr,
            "width": d_sae,
            "k": args.k,
            "target_l0": args.target_l0,
            "l0_coefficient": args.l0_coefficient,
            "init_threshold": args.init_threshold,
            "pre_act_loss": args.pre_act_loss,
            "aux_loss": args.aux_loss,
            "decoder_init_norm": args.decoder_init_norm,
            "dead_window": args.dead_window,
            "threads": args.threads,
            "ctx": args.ctx,
            "command": "yapo-fast sae train "
            + " ".join(sys.argv[3:] if sys.argv[1:3] == ["sae", "train"] else sys.argv[1:]),
        },
    }
    samples = args.samples or len(acts)
    sae = train_on_activations(
        acts,
        kind=args.kind,
        d_sae=d_sae,
        k=args.k,
        target_l0=args.target_l0,
        l0_coefficient=args.l0_coefficient,
        init_threshold=args.init_threshold,
        pre_act_loss=args.pre_act_loss,
        aux_loss=args.aux_loss,
        decoder_init_norm=args.decoder_init_norm,
        dead_window=args.dead_window,
        total_samples=samples,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_dir=work / f"checkpoint-{args.kind}-w{d_sae}",
        checkpoint_every=args.checkpoint_every,
        metadata=meta,
        progress=not args.quiet,
        log=log,
    )
    sae.name = args.name or out.name
    sae.layer, sae.model_name = args.layer, meta["model_name"]
    sae.metadata = {**sae.metadata, **meta}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    save_sae(sae.to(dtype=dtype), out)
    out.chmod(0o755)  # the atomic temp dir was created 0700
    for f in out.iterdir():
        f.chmod(0o644)
    write_text_atomic(
        work / "train_result.json", json.dumps({"out": str(out), "seconds": time.time() - t0, **meta}, indent=1)
    )
    log(f"wrote {out} ({args.kind}, layer {args.layer}, width {d_sae}, {args.dtype}) in {time.time() - t0:.0f}s")
    return out


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train an SAE on a model's residual stream with sae-lens (resumable)")
    p.add_argument(
        "--model", default=None, help="transformers model id or path (default: embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument("--layer", type=int, required=True, help="decoder layer whose OUTPUT the SAE reads")
    p.add_argument("--kind", default="jumprelu", choices=TRAIN_KINDS)
    p.add_argument("--width", type=int, default=None, help="number of latents (default 8 x d_model)")
    p.add_argument("--k", type=int, default=None, help="topk: active latents per token")
    p.add_argument("--target-l0", type=float, default=96.0, help="jumprelu: L0 the quadratic sparsity penalty aims at")
    p.add_argument("--l0-coefficient", type=float, default=1.0, help="jumprelu: weight of the sparsity penalty")
    p.add_argument(
        "--init-threshold",
        type=float,
        default=0.1,
        help="jumprelu: initial threshold (in units of the normalised input, |h| = sqrt(d_model))",
    )
    p.add_argument(
        "--pre-act-loss",
        type=float,
        default=3e-6,
        help="jumprelu: coefficient of the pre-activation loss on dead latents (0: off)",
    )
    p.add_argument("--aux-loss", type=float, default=1.0, help="topk: coefficient of the AuxK loss on dead latents")
    p.add_argument("--decoder-init-norm", type=float, default=0.1, help="initial norm of decoder rows")
    p.add_argument(
        "--dead-window",
        type=int,
        default=None,
        help="samples without firing after which a latent counts as dead for the pre-activation / "
        "AuxK loss (default: a quarter of the run)",
    )
    p.add_argument("--tokens", type=int, default=100_000, help="token budget of distinct activations")
    p.add_argument("--samples", type=int, default=None, help="training samples (default: --tokens; more = epochs)")
    p.add_argument("--batch-size", type=int, default=128, help="SAE training batch (tokens)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam lr (cosine to lr/10); high because CPU runs are short")
    p.add_argument("--ctx", type=int, default=256, help="tokens per text window")
    p.add_argument(
        "--mix",
        default="corpus=0.7,chat=0.3",
        help="token shares of the text sources (corpus: books+WikiText; chat: steering prompts "
        "with the model's own answers), recorded in the SAE's metadata",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forward-batch", type=int, default=8, help="sequences per model forward")
    p.add_argument("--checkpoint-every", type=int, default=50_000, help="samples between resumable checkpoints")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"), help="stored weights")
    p.add_argument("--name", default=None, help="SAE name (default: the output directory's name)")
    p.add_argument("--work-dir", default=None, help="activation cache + checkpoints (default: .<out>.work beside out)")
    p.add_argument("--activations-dir", default=None, help="share an activation cache between runs")
    p.add_argument(
        "--cache-layers",
        default=None,
        help="also cache these layers' activations in the same forward (e.g. 9,12,18: layer comparisons)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: measured fastest on a shared 2-core machine)"
    )
    p.add_argument(
        "--collect-only",
        action="store_true",
        help="collect (cache) the activations for this budget and stop; a later run trains on them",
    )
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", required=True, help="output directory (sae-lens format)")
    p.set_defaults(func=run_train)


def run_answers(args) -> Path:
    """`yapo-fast sae answers`: the model's greedy answers to the chat source's prompts (JSONL,
    resumable). The default model's file ships in assets/data/chat_answers/ (made by this command)."""
    from yapo_fast.data.text_source import ANSWER_TOKENS, interleaved_chat_prompts, write_answers
    from yapo_fast.model import load_model

    if args.threads < 1:
        raise YapoFastError(f"--threads {args.threads}: need at least 1")
    torch.set_num_threads(args.threads)
    splits = ("train", "heldout") if args.split == "all" else (args.split,)
    prompts = [p for split in splits for p in interleaved_chat_prompts(split)[: args.limit]]
    model, tok = load_model(args.model)
    t0 = time.time()
    answers = write_answers(
        model,
        tok,
        prompts,
        Path(args.out),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens or ANSWER_TOKENS,
        progress=not args.quiet,
    )
    print(
        f"[sae answers] {sum(p in answers for p in prompts)} of {len(prompts)} prompts answered in {args.out} "
        f"({time.time() - t0:.0f}s)",
        file=sys.stderr,
    )
    return Path(args.out)


def add_answers_parser(sub) -> None:
    p = sub.add_parser("answers", help="the model's greedy answers to the SAE text source's chat prompts (resumable)")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--split", default="all", choices=("train", "heldout", "all"))
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="answer only the first N prompts of each split (round-robin over BiPO behaviours and BLEnD)",
    )
    p.add_argument("--batch-size", type=int, default=48, help="prompts per generate() call")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: text_source.ANSWER_TOKENS (48)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", required=True, help="JSONL file (prompt, answer); existing answers are kept")
    p.set_defaults(func=run_answers)
