"""The naive trainer: the baseline, written plainly as the reference code does it.

Every step runs the FULL model twice on the 2B sequences prompt+response (chosen, rejected):
once steered through a forward hook on layer L (full SAE encode and decode of every position,
kernels/sparse_steer_reference.py), once unsteered for the reference log-probs. Logits at every
position; log-probs summed over response tokens. Same batch order, d, optimizer and schedule as
the lean trainer (yapo_fast.train.batch_schedule / make_optimizer), so the two can be compared
step by step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from yapo_fast.chat import format_prompt, prompt_and_response_ids
from yapo_fast.kernels.sparse_steer_reference import dense_steer_reference, sparse_steer_reference
from yapo_fast.model import decoder_layers
from yapo_fast.train import TrainConfig, batch_schedule, make_optimizer


class ByteTokenizer:
    """A tokenizer for tiny random models: one token per byte (mod vocab), no chat template."""

    chat_template = None
    pad_token_id = 0

    def __init__(self, vocab: int = 128):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + b % (self.vocab - 1) for b in text.encode()]}


class NaiveTrainer:
    def __init__(self, method, model, tokenizer, pairs, layer, sae=None, beta=0.1, system=None):
        self.method, self.model, self.sae, self.layer, self.beta = method, model, sae, layer, beta
        self.seqs = []
        for pair in pairs:
            text = format_prompt(tokenizer, pair.prompt, system)
            p, c = prompt_and_response_ids(tokenizer, text, pair.chosen)
            _, r = prompt_and_response_ids(tokenizer, text, pair.rejected)
            self.seqs.append((p, c, r))

    def _logprobs(self, ids, mask, resp_mask):
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        return (logp * resp_mask[:, 1:]).sum(-1)

    def loss(self, indices, v, d):
        """Mean DPO loss of the batch (differentiable in v)."""
        seqs = [self.seqs[i][0] + self.seqs[i][1] for i in indices] + [
            self.seqs[i][0] + self.seqs[i][2] for i in indices
        ]
        plens = [len(self.seqs[i][0]) for i in indices] * 2
        n = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        mask = torch.zeros(len(seqs), n, dtype=torch.long)
        resp = torch.zeros(len(seqs), n)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
            resp[j, plens[j] : len(s)] = 1

        def hook(_module, _inputs, output):
            h = output if isinstance(output, torch.Tensor) else output[0]
            if self.method == "yapo":
                h2 = sparse_steer_reference(h, self.sae, v, d)
            else:
                h2 = dense_steer_reference(h, v, d)
            return h2 if isinstance(output, torch.Tensor) else (h2, *output[1:])

        handle = decoder_layers(self.model)[self.layer].register_forward_hook(hook)
        try:
            policy = self._logprobs(ids, mask, resp)
        finally:
            handle.remove()
        with torch.no_grad():
            reference = self._logprobs(ids, mask, resp)
        B = len(indices)
        ratio = policy - reference
        return -F.logsigmoid(d * self.beta * (ratio[:B] - ratio[B:])).mean()

    def train(
        self,
        *,
        epochs=1,
        batch_size=4,
        lr=5e-4,
        warmup_steps=100,
        grad_clip=1.0,
        seed=0,
        steps=None,
        record_grads=False,
    ):
        """Returns (v, per-step records [{loss, d, grad?}])."""
        cfg = TrainConfig(
            method=self.method,
            layer=self.layer,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=warmup_steps,
            grad_clip=grad_clip,
            seed=seed,
            beta=self.beta,
        )
        schedule = batch_schedule(len(self.seqs), batch_size, epochs, seed)
        size = self.sae.d_sae if self.method == "yapo" else self.model.config.hidden_size
        v = torch.zeros(size, requires_grad=True)
        opt, sched = make_optimizer(v, cfg, len(schedule))
        records = [
            self.step(batch, v, d, opt, sched, grad_clip, record_grads=record_grads) for _, batch, d in schedule[:steps]
        ]
        return v.detach(), records

    def step(self, batch, v, d, opt, sched, grad_clip, *, record_grads=False) -> dict:
        """One update as the reference trainers do it: backward, clip, AdamW, cosine schedule.
        Returns {loss, d, v (before the update), grad (before clipping, if asked)}."""
        opt.zero_grad()
        loss = self.loss(batch, v, d)
        loss.backward()
        rec = {"loss": float(loss.detach()), "d": d, "v": v.detach().clone()}
        if record_grads:
            rec["grad"] = v.grad.detach().clone()
        torch.nn.utils.clip_grad_norm_([v], grad_clip)
        opt.step()
        sched.step()
        return rec
