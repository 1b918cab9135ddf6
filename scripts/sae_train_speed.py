"""SAE training speed with 1 vs 2 torch threads (docs/sae.md: why --threads 1).

Times sae-lens's SAETrainer.fit alone (yapo_fast.sae.train.train_on_activations on random rows;
the step cost does not depend on the values), e.g.

    cd /tmp && for n in 1 2; do OMP_NUM_THREADS=$n "$REPO/.venv/bin/python" \
        "$REPO/scripts/sae_train_speed.py" $n jumprelu 128 60 2>/dev/null | tail -1; done   # REPO: your checkout
"""

import sys
import time

import torch


def main():
    threads = int(sys.argv[1])
    kind = sys.argv[2] if len(sys.argv) > 2 else "jumprelu"
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 60
    torch.set_num_threads(threads)
    from sae_lens.training.sae_trainer import SAETrainer

    from yapo_fast.sae.train import train_on_activations

    fit, seconds = SAETrainer.fit, {}

    def timed_fit(self):
        t = time.time()
        out = fit(self)
        seconds["fit"] = time.time() - t
        return out

    SAETrainer.fit = timed_fit
    torch.manual_seed(0)
    acts = torch.randn(20000, 576) * 3 + torch.randn(576)
    train_on_activations(acts, kind=kind, d_sae=4608, k=32, total_samples=steps * batch, batch_size=batch)
    s = seconds["fit"]
    print(
        f"threads={threads} kind={kind} batch={batch}: {steps * batch / s:.0f} samples/s "
        f"({s / steps * 1000:.0f} ms/step over {steps} steps)"
    )


if __name__ == "__main__":
    main()
