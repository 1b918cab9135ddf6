"""Reliability (issue 8), kill and resume: the trainer and the SAE trainer are killed with SIGKILL
(kill -9: no exception handler, no `finally`) at seeded random moments, again and again, and every
resumed run ends with exactly what an uninterrupted run with the same seed ends with, bit for bit,
with no half-written or temporary file left beside the outputs.

The work runs in one driver subprocess (this file run as a script): it builds the tiny model once,
then forks a child per attempt and kills it. Forking keeps each attempt cheap (no re-import of
torch), so the test stays within about a minute and a half for 20+ kills."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

KILLS = {"trainer": 12, "sae": 10}  # kills that hit a live process, per kind
SEED = 20260108


def test_kill_9_at_random_points_then_resume_equals_the_uninterrupted_run(tmp_path):
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path), str(SEED)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:  # the driver and any child it forked: nothing outlives the test
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    for kind, want in KILLS.items():
        r = report[kind]
        assert r["kills"] >= want, r
        assert r["equal"] == r["runs"] and r["runs"] >= 2, r  # every resumed run: the uninterrupted result
        assert r["leftovers"] == [], r  # no temporary or half-written file anywhere
        assert r["resumed_mid_run"] >= 1, r  # at least one resume really continued a checkpoint
    assert sum(report[k]["kills"] for k in KILLS) >= 20
    print(f"{report} in {time.time() - t0:.0f}s")


# ------------------------------------------------------------------------------------------------
# the driver (python tests/test_reliability_kill.py WORKDIR SEED); prints one JSON line
# ------------------------------------------------------------------------------------------------
def _fork_run(fn) -> int:
    import threading

    assert threading.active_count() == 1, f"the driver must fork single-threaded: {threading.enumerate()}"
    pid = os.fork()
    if pid == 0:  # child: run, then leave without pytest/atexit machinery
        code = 0
        try:
            _fresh_tqdm_lock()
            fn()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def _wait(pid: int, what: str, limit: float = 240.0) -> int:
    """waitpid with a deadline, so a stuck child fails the test with its name instead of a bare
    600 s timeout of the whole driver."""
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise RuntimeError(f"{what} did not finish within {limit:.0f} s (stuck child)")
        time.sleep(0.05)


def _fresh_tqdm_lock() -> None:
    """tqdm guards its bars with a multiprocessing lock: a semaphore SHARED with every forked
    process. A child SIGKILLed while holding it would leave it held for all later children (a
    hazard of forking killed children, not of separate processes, which each make their own)."""
    import threading

    from tqdm import auto, std

    for cls in {std.tqdm, auto.tqdm}:
        cls.set_lock(threading.RLock())


def _attempts(
    fn, *, duration: float, kills: int, rng: random.Random, checkpoint: Path, run_dir: Path, max_attempts: int = 60
):
    """Start fn in a child, SIGKILL it after a random fraction of `duration`; repeat until `kills`
    kills have hit a live child; then let a last child finish. Returns (kills that hit, whether
    the last child started from a checkpoint left by a killed one)."""
    hit = 0
    for _ in range(max_attempts):
        if hit >= kills:
            break
        pid = _fork_run(fn)
        time.sleep(rng.uniform(0.0, duration))
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            hit += 1
        elif os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("a child failed on its own (see its traceback above)")
        else:  # it finished before its kill: start the run over, or every later attempt is a no-op
            shutil.rmtree(run_dir)
    resumes = checkpoint.exists()
    pid = _fork_run(fn)
    if _wait(pid, "the final resumed run") != 0:
        raise RuntimeError("the final resumed run failed (see its traceback above)")
    return hit, resumes


def _timed(fn) -> float:
    t = time.perf_counter()
    pid = _fork_run(fn)
    if _wait(pid, "the uninterrupted run") != 0:
        raise RuntimeError("the uninterrupted run failed")
    return time.perf_counter() - t


def _leftovers(folder: Path, allowed) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.endswith(".tmp") or not allowed(p.relative_to(folder))
    )


def _trainer_part(work: Path, rng: random.Random) -> dict:
    import torch
    from trainer_fixtures import KW, tiny_pairs, tiny_setup

    import yapo_fast
    from yapo_fast.vector import load_vector

    model, tok, sae = tiny_setup("jumprelu")
    pairs = tiny_pairs(6)  # 3 steps per epoch, 9 in all; a checkpoint every 2 steps and per epoch

    def run(out: Path, method: str):
        return lambda: yapo_fast.train(
            method,
            pairs,
            model=model,
            tokenizer=tok,
            sae=sae if method == "yapo" else None,
            out=out,
            checkpoint_every=2,
            **KW,
        )

    result = {"kills": 0, "runs": 0, "equal": 0, "leftovers": [], "resumed_mid_run": 0}
    expected = {
        "v.safetensors",
        "v.losses.jsonl",
        "v.ckpt.safetensors",
        *(f"v.epoch{k}.safetensors" for k in (1, 2, 3)),
    }
    for method, kills in (("yapo", KILLS["trainer"] // 2 + KILLS["trainer"] % 2), ("bipo", KILLS["trainer"] // 2)):
        ref_dir, dir_ = work / f"trainer-{method}-ref", work / f"trainer-{method}-killed"
        duration = _timed(run(ref_dir / "v.safetensors", method))
        hit, resumes = _attempts(
            run(dir_ / "v.safetensors", method),
            duration=duration,
            kills=kills,
            rng=rng,
            checkpoint=dir_ / "v.ckpt.safetensors",
            run_dir=dir_,
        )
        result["kills"] += hit
        result["resumed_mid_run"] += resumes
        result["runs"] += 1
        ref, got = load_vector(ref_dir / "v.safetensors"), load_vector(dir_ / "v.safetensors")
        same_vector = torch.equal(ref.values, got.values) and (
            ref.indices is None or torch.equal(ref.indices, got.indices)
        )
        ref_log = [json.loads(x) for x in (ref_dir / "v.losses.jsonl").read_text().splitlines()]
        got_log = [json.loads(x) for x in (dir_ / "v.losses.jsonl").read_text().splitlines()]
        same_log = [(r["step"], r["loss"]) for r in ref_log] == [(r["step"], r["loss"]) for r in got_log]
        same_epochs = all(
            torch.equal(
                load_vector(ref_dir / f"v.epoch{k}.safetensors").values,
                load_vector(dir_ / f"v.epoch{k}.safetensors").values,
            )
            for k in (1, 2, 3)
        )
        result["equal"] += bool(same_vector and same_log and same_epochs and float(ref.values.abs().max()) > 0)
        result["leftovers"] += _leftovers(dir_, lambda p: str(p) in expected)
        # a finished run is not trained again: resuming it reports the last step
        again = yapo_fast.train(
            method,
            pairs,
            model=model,
            tokenizer=tok,
            sae=sae if method == "yapo" else None,
            out=dir_ / "v.safetensors",
            checkpoint_every=2,
            **KW,
        )
        assert again.resumed_from == 9
    result["resumed_mid_run"] += _count_resumes_trainer(work, model, tok, sae, pairs, rng)
    return result


def _count_resumes_trainer(work, model, tok, sae, pairs, rng) -> int:
    """Kill once right after the checkpoint of step 4 (a deterministic point) and check the resume
    starts there: the random kills above might all have landed before the first checkpoint."""
    from trainer_fixtures import KW

    import yapo_fast

    out = work / "trainer-fixed" / "v.safetensors"

    def stop_after_5(rec):
        if rec["step"] == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    pid = _fork_run(
        lambda: yapo_fast.train(
            "yapo", pairs, model=model, tokenizer=tok, sae=sae, out=out, checkpoint_every=2, callback=stop_after_5, **KW
        )
    )
    os.waitpid(pid, 0)
    resumed = yapo_fast.train("yapo", pairs, model=model, tokenizer=tok, sae=sae, out=out, checkpoint_every=2, **KW)
    return int(resumed.resumed_from == 4)


def _sae_part(work: Path, rng: random.Random) -> dict:
    import torch
    from helpers import tiny_llama

    from yapo_fast import load_sae
    from yapo_fast.integrations.sae_lens_loading import save_sae
    from yapo_fast.sae.train import collect_activations, load_activation_chunks, train_on_activations

    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    sequences = [
        torch.randint(1, 128, (int(n),), generator=g).tolist() for n in torch.randint(12, 40, (64,), generator=g)
    ]  # 4 activation chunks of 16 sequences

    def run(folder: Path, kind: str, log=None):
        def fn():
            chunks = collect_activations(model, {1: folder / "acts"}, sequences, pad_id=0, batch_size=8, progress=False)
            acts = load_activation_chunks(chunks[1])
            trained = train_on_activations(
                acts,
                kind=kind,
                d_sae=96,
                k=6,
                target_l0=6,
                total_samples=64 * 24,
                batch_size=64,
                seed=3,
                checkpoint_dir=folder / "ck",
                checkpoint_every=64 * 4,
                metadata={"hook_name": "blocks.1.hook_resid_post"},
                log=log,
            )
            save_sae(trained, folder / "sae")

        return fn

    result = {"kills": 0, "runs": 0, "equal": 0, "leftovers": [], "resumed_mid_run": 0}
    for kind, kills in (("jumprelu", KILLS["sae"] // 2 + KILLS["sae"] % 2), ("topk", KILLS["sae"] // 2)):
        ref_dir, dir_ = work / f"sae-{kind}-ref", work / f"sae-{kind}-killed"
        duration = _timed(run(ref_dir, kind))
        hit, resumes = _attempts(
            run(dir_, kind), duration=duration, kills=kills, rng=rng, checkpoint=dir_ / "ck" / "latest", run_dir=dir_
        )
        result["kills"] += hit
        result["resumed_mid_run"] += resumes
        result["runs"] += 1
        ref, got = load_sae(ref_dir / "sae"), load_sae(dir_ / "sae")
        names = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if kind == "jumprelu" else [])
        result["equal"] += all(torch.equal(getattr(ref, n), getattr(got, n)) for n in names)
        acts_ref = sorted(p.name for p in (ref_dir / "acts").iterdir())
        result["equal"] -= acts_ref != sorted(p.name for p in (dir_ / "acts").iterdir())
        result["leftovers"] += _leftovers(dir_, lambda p: p.parts[0] in ("acts", "ck", "sae"))
        result["resumed_mid_run"] += _count_resumes_sae(work / f"sae-{kind}-fixed", ref_dir, kind, run)
    return result


def _count_resumes_sae(folder: Path, ref_dir: Path, kind: str, run) -> int:
    """Kill as soon as the first checkpoint is on disk (a deterministic point: the random kills
    above may all land before it on a loaded machine), then check that the resumed run says it
    continued that checkpoint and ends with the uninterrupted run's weights."""
    import torch

    from yapo_fast import load_sae

    marker = folder / "ck" / "latest" / "yapo_fast_resume.json"
    pid = _fork_run(run(folder, kind))
    deadline = time.monotonic() + 240
    while not marker.exists() and time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            raise RuntimeError("the run ended before writing its first checkpoint")
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if (folder / "sae").exists():
        return 0  # it finished before the kill landed: no resume to check

    def note(message: str) -> None:
        (folder / "resume.log").write_text(message)

    if _wait(_fork_run(run(folder, kind, log=note)), "the resumed run after the fixed kill") != 0:
        raise RuntimeError("the resumed run after the fixed kill failed (see its traceback above)")
    ref, got = load_sae(ref_dir / "sae"), load_sae(folder / "sae")
    same = all(torch.equal(getattr(ref, n), getattr(got, n)) for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
    resumed = (folder / "resume.log").exists() and "resuming from checkpoint" in (folder / "resume.log").read_text()
    return int(same and resumed)


def _driver(work: Path, seed: int) -> None:
    import torch

    torch.set_num_threads(1)  # before anything runs: forked children then never meet an OpenMP pool
    # Fork only from a single-threaded driver: tqdm's monitor thread (started by the first bar the
    # driver itself shows) was alive at 22 of 51 forks and a child then hung once in a loaded CI run.
    # Bars are off (TQDM_DISABLE, set by the test) and the monitor can never start.
    from tqdm import auto, std

    for cls in {std.tqdm, auto.tqdm}:
        cls.monitor_interval = 0
    _fresh_tqdm_lock()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rng = random.Random(seed)
    t0 = time.time()
    report = {"trainer": _trainer_part(work, rng)}
    report["trainer"]["seconds"] = round(time.time() - t0, 1)
    t1 = time.time()
    report["sae"] = _sae_part(work, rng)
    report["sae"]["seconds"] = round(time.time() - t1, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    _driver(Path(sys.argv[1]), int(sys.argv[2]))
