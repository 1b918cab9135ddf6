"""Reliability (issue 8), files: vectors, SAEs and checkpoints are read only through safetensors and
JSON (a pickle is refused and never unpickled), their metadata is checked before anything is built
from it, and every write is atomic (an interrupted write leaves the old file or nothing, and the
temporaries of a killed writer are swept by the next write)."""

import ast
import json
import multiprocessing
import os
import random
import signal
import struct
import time
from pathlib import Path

import pytest
import torch
from helpers import random_latent, random_sae
from safetensors.torch import save_file

from yapo_fast import SteeringVector, YapoFastError, load_sae, load_vector
from yapo_fast.integrations.sae_lens_loading import save_sae

ROOT = Path(__file__).resolve().parents[1]


class _Bomb:
    """Unpickling this creates `marker`: proof that a file was (or was not) unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickle_bomb(path: Path, marker: Path) -> Path:
    torch.save({"values": torch.ones(3), "payload": _Bomb(marker)}, path)
    return path


def _vector(seed=0):
    sae = random_sae("jumprelu")
    return SteeringVector.from_latent(random_latent(96, 9, "mixed", seed=seed), layer=2, sae=sae)


def _no_temporaries(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---- reading: no pickle ---------------------------------------------------------------------------
def test_pickle_files_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "UNPICKLED"
    for name in ("v.pt", "v.bin", "v.safetensors"):  # a pickle under any name, the safetensors one too
        with pytest.raises(YapoFastError, match="not a readable steering vector"):
            load_vector(_pickle_bomb(tmp_path / name, marker))
    # an SAE directory whose weights are a pickle (named .safetensors, or .pt beside cfg.json)
    save_sae(random_sae("relu"), tmp_path / "sae")
    _pickle_bomb(tmp_path / "sae" / "sae_weights.safetensors", marker)
    with pytest.raises(YapoFastError, match="not a readable safetensors file"):
        load_sae(tmp_path / "sae")
    (tmp_path / "sae" / "sae_weights.safetensors").rename(tmp_path / "sae" / "sae_weights.pt")
    with pytest.raises(YapoFastError, match="needs cfg.json and sae_weights.safetensors"):
        load_sae(tmp_path / "sae")
    # a trainer checkpoint that is a pickle
    from yapo_fast.train.checkpoint import load_checkpoint

    with pytest.raises(YapoFastError, match="unreadable"):
        load_checkpoint(
            _pickle_bomb(tmp_path / "c.ckpt.safetensors", marker),
            v=torch.zeros(3),
            optimizer=None,
            scheduler=None,
            fingerprint="x",
        )
    assert not marker.exists()


def test_sae_trainer_checkpoint_pickle_is_refused(tmp_path):
    """sae-lens keeps its trainer state in a torch.save file: resuming reads it with weights_only
    (torch's default), so a checkpoint carrying code is refused with a clear error, never run."""
    from sae_lens.constants import TRAINER_STATE_FILENAME

    from yapo_fast.sae.train import train_on_activations

    torch.manual_seed(0)
    acts = torch.randn(256, 16) + 1.0
    kw = dict(
        kind="topk",
        d_sae=32,
        k=4,
        total_samples=32 * 6,
        batch_size=32,
        seed=0,
        checkpoint_every=32 * 3,
        checkpoint_dir=tmp_path / "ck",
    )
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only", "default"))
        return real_load(*args, **kwargs)

    train_on_activations(acts, **kw)  # leaves a checkpoint after step 3 in ck/latest
    marker = tmp_path / "UNPICKLED"
    _pickle_bomb(tmp_path / "ck" / "latest" / TRAINER_STATE_FILENAME, marker)
    torch.load = recording_load
    try:
        with pytest.raises(YapoFastError, match="checkpoint .* is unreadable"):
            train_on_activations(acts, **kw)
    finally:
        torch.load = real_load
    assert not marker.exists()
    assert calls and all(c in ("default", True) for c in calls), calls
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") in (None, "", "0")


def _calls_named(tree, names):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            dotted = (
                f"{f.value.id}.{f.attr}"
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                else getattr(f, "id", None)
            )
            if dotted in names:
                yield dotted, node


def test_no_code_path_unpickles():
    """Static proof over the package: no pickle.load(s), no np.load(allow_pickle=True), and no
    torch.load that turns weights_only off (there is none at all today)."""
    offenders = []
    for folder in ("yapo_fast", "integrations", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for name, node in _calls_named(
                tree, {"pickle.load", "pickle.loads", "torch.load", "np.load", "numpy.load", "dill.load", "joblib.load"}
            ):
                kws = {k.arg: k.value for k in node.keywords}
                safe = (
                    name == "torch.load"
                    and isinstance(kws.get("weights_only"), ast.Constant)
                    and kws["weights_only"].value is True
                ) or (
                    name in ("np.load", "numpy.load")
                    and not (isinstance(kws.get("allow_pickle"), ast.Constant) and kws["allow_pickle"].value)
                )
                if not safe:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    if any(m in ("pickle", "dill", "cloudpickle", "joblib") for m in mods):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {mods}")
    assert not offenders, offenders


# ---- reading: metadata before tensors -----------------------------------------------------------
def _raw_safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_absurd_headers_and_shapes_are_refused(tmp_path):
    # header length field of 2^62 bytes; a tensor claiming 2^40 floats in a 16-byte file
    huge_len = tmp_path / "hl.safetensors"
    huge_len.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    huge_shape = _raw_safetensors(
        tmp_path / "hs.safetensors",
        {
            "values": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4 << 40]},
            "__metadata__": {"yapo_fast": json.dumps({"method": "bipo", "layer": 0, "d_model": 1 << 40})},
        },
        b"\0" * 16,
    )
    for path in (huge_len, huge_shape):
        with pytest.raises(YapoFastError, match="corrupt or truncated"):
            load_vector(path)
    # a consistent file whose header claims an absurd width (latent() would allocate d_sae floats)
    header = {"method": "yapo", "layer": 2, "d_model": 64, "d_sae": 1 << 40}
    save_file(
        {"values": torch.ones(2), "indices": torch.tensor([1, 5])},
        str(tmp_path / "w.safetensors"),
        metadata={"yapo_fast": json.dumps(header)},
    )
    with pytest.raises(YapoFastError, match="d_sae .*at most"):
        load_vector(tmp_path / "w.safetensors")
    # an SAE whose cfg.json claims 10^12 latents: refused before sae-lens allocates anything
    save_sae(random_sae("jumprelu"), tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    good_cfg = json.loads(cfg_path.read_text())
    import sae_lens

    real = sae_lens.SAE.load_from_disk

    def must_not_run(*a, **k):
        raise AssertionError("sae-lens was asked to build an SAE from an unchecked cfg.json")

    sae_lens.SAE.load_from_disk = must_not_run
    try:
        for bad, match in (
            ({"d_sae": 10**12}, "d_sae must be a positive integer"),
            ({"d_sae": "big"}, "d_sae must be a positive integer"),
            ({"d_in": True}, "d_in must be a positive integer"),
            ({"d_sae": 128}, r"W_enc has shape \(64, 96\) but cfg.json .* implies \(64, 128\)"),
            ({"architecture": "jumprelu", "d_in": 96, "d_sae": 64}, "W_enc has shape"),
        ):
            cfg_path.write_text(json.dumps({**good_cfg, **bad}))
            with pytest.raises(YapoFastError, match=match):
                load_sae(tmp_path / "sae")
        cfg_path.write_text("{not json")
        with pytest.raises(YapoFastError, match="not valid JSON"):
            load_sae(tmp_path / "sae")
        cfg_path.write_text("[1, 2]")
        with pytest.raises(YapoFastError, match="JSON object"):
            load_sae(tmp_path / "sae")
    finally:
        sae_lens.SAE.load_from_disk = real


def test_wrong_kind_truncated_and_disagreeing_sae_files(tmp_path):
    save_sae(random_sae("topk"), tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])  # truncated
    with pytest.raises(YapoFastError, match="corrupt or truncated"):
        load_sae(tmp_path / "sae")
    _vector().save(weights)  # a steering vector where the SAE weights belong
    with pytest.raises(YapoFastError, match="W_enc has shape None"):
        load_sae(tmp_path / "sae")
    # a threshold missing from a jumprelu SAE's weights
    sae = random_sae("jumprelu")
    save_sae(sae, tmp_path / "jr")
    tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "jr" / "sae_weights.safetensors"))
    with pytest.raises(YapoFastError, match="threshold has shape None"):
        load_sae(tmp_path / "jr")
    # an SAE directory handed to load_vector, a vector file handed to load_sae
    with pytest.raises(YapoFastError, match="no steering vector file"):
        load_vector(tmp_path / "jr")
    with pytest.raises(YapoFastError, match="not a directory in sae-lens format"):
        load_sae(_vector().save(tmp_path / "v.safetensors"))


@pytest.mark.parametrize(
    "header,match",
    [
        ({"method": "bipo", "layer": "2", "d_model": 3}, "layer must be a non-negative int"),
        ({"method": "bipo", "layer": 1, "d_model": 3.0}, "d_model must be a positive int"),
        ({"method": "bipo", "layer": 1, "d_model": 3, "multiplier": 1e9}, "outside the supported range"),
        ({"method": "bipo", "layer": 1, "d_model": 3, "multiplier": "1"}, "must be a finite number"),
        ({"method": "bipo", "layer": 1, "d_model": 3, "extra": 1}, "unknown fields"),
        (["bipo"], "lacks its 'values' tensor or header"),
    ],
)
def test_vector_header_types_are_checked(tmp_path, header, match):
    save_file({"values": torch.ones(3)}, str(tmp_path / "v.safetensors"), metadata={"yapo_fast": json.dumps(header)})
    with pytest.raises(YapoFastError, match=match):
        load_vector(tmp_path / "v.safetensors")


def test_vector_tensor_kinds_are_checked(tmp_path):
    header = {"method": "bipo", "layer": 1, "d_model": 4}
    for values, match in ((torch.ones(4, dtype=torch.int32), "floating-point"), (torch.ones(2, 2), "1-D")):
        save_file({"values": values}, str(tmp_path / "v.safetensors"), metadata={"yapo_fast": json.dumps(header)})
        with pytest.raises(YapoFastError, match=match):
            load_vector(tmp_path / "v.safetensors")
    header = {"method": "yapo", "layer": 1, "d_model": 4, "d_sae": 8}
    save_file(
        {"values": torch.ones(2), "indices": torch.tensor([1.0, 2.0])},
        str(tmp_path / "v.safetensors"),
        metadata={"yapo_fast": json.dumps(header)},
    )
    with pytest.raises(YapoFastError, match="integer `indices`"):
        load_vector(tmp_path / "v.safetensors")
    save_file(
        {"values": torch.ones(2), "indices": torch.tensor([3, 2])},
        str(tmp_path / "v.safetensors"),
        metadata={"yapo_fast": json.dumps(header)},
    )
    with pytest.raises(YapoFastError, match="sorted and unique"):
        load_vector(tmp_path / "v.safetensors")


def test_trainer_checkpoint_of_the_wrong_kind_or_truncated(tmp_path):
    from yapo_fast.train.checkpoint import load_checkpoint

    path = _vector().save(tmp_path / "c.ckpt.safetensors")  # a vector, not a checkpoint
    with pytest.raises(YapoFastError, match="unreadable"):
        load_checkpoint(path, v=torch.zeros(3), optimizer=None, scheduler=None, fingerprint="x")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(YapoFastError, match="unreadable"):
        load_checkpoint(path, v=torch.zeros(3), optimizer=None, scheduler=None, fingerprint="x")


# ---- writing: atomic ----------------------------------------------------------------------------
class DiskFull(OSError):
    pass


def _half_then_fail(real_bytes: bytes):
    """A writer that gets half of its bytes onto disk, then fails (full disk, I/O error)."""

    def write(path):
        Path(path).write_bytes(real_bytes[: len(real_bytes) // 2])
        raise DiskFull("simulated failure mid-write")

    return write


def test_interrupted_vector_and_checkpoint_writes_keep_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    from yapo_fast.train.checkpoint import load_checkpoint, save_checkpoint
    from yapo_fast.train.config import TrainConfig, make_optimizer

    old, new = _vector(0), _vector(1)
    path = old.save(tmp_path / "v.safetensors")
    real_bytes = path.read_bytes()
    v = torch.zeros(8, requires_grad=True)
    opt, sched = make_optimizer(v, TrainConfig(method="bipo", layer=0, warmup_steps=1), 10)
    save_checkpoint(tmp_path / "c.ckpt.safetensors", v=v, optimizer=opt, scheduler=sched, step=3, fingerprint="f")
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", lambda tensors, p, metadata=None: _half_then_fail(real_bytes)(p))
        with pytest.raises(DiskFull):
            new.save(path)
        with pytest.raises(DiskFull):
            save_checkpoint(
                tmp_path / "c.ckpt.safetensors", v=v, optimizer=opt, scheduler=sched, step=4, fingerprint="f"
            )
        with pytest.raises(DiskFull):
            new.save(tmp_path / "fresh.safetensors")  # no old file: nothing is left
    assert torch.equal(load_vector(path).latent(), old.latent())
    assert load_checkpoint(tmp_path / "c.ckpt.safetensors", v=v, optimizer=opt, scheduler=sched, fingerprint="f") == (
        3,
        False,
    )
    assert not (tmp_path / "fresh.safetensors").exists()
    assert _no_temporaries(tmp_path) == []


def test_interrupted_sae_write_keeps_the_old_sae(tmp_path, monkeypatch):
    from yapo_fast.integrations import sae_lens_loading

    old = random_sae("jumprelu", seed=1)
    save_sae(old, tmp_path / "sae")

    class HalfWriter:
        def save_model(self, folder):
            (Path(folder) / "cfg.json").write_text('{"d_in": 64, "d_s')
            raise DiskFull("simulated failure mid-write")

    monkeypatch.setattr(sae_lens_loading, "to_sae_lens", lambda sae: HalfWriter())
    with pytest.raises(DiskFull):
        save_sae(random_sae("jumprelu", seed=2), tmp_path / "sae")
    with pytest.raises(DiskFull):
        save_sae(random_sae("jumprelu", seed=2), tmp_path / "new-sae")
    monkeypatch.undo()
    assert load_sae(tmp_path / "sae").weights_hash() == old.weights_hash()
    assert not (tmp_path / "new-sae").exists() and _no_temporaries(tmp_path) == []


def test_interrupted_report_and_eval_json_keep_the_old_files(tmp_path, monkeypatch):
    from yapo_fast.eval.report import write_report

    paths = write_report({"meta": {"model": "m"}}, tmp_path / "r")
    before = {p: p.read_bytes() for p in (paths["json"], paths["markdown"])}
    real_write_text = Path.write_text

    def half(self, text, *a, **k):
        real_write_text(self, text[: len(text) // 2], *a, **k)
        raise DiskFull("simulated failure mid-write")

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(DiskFull):
        write_report({"meta": {"model": "other"}}, tmp_path / "r")
    # `yapo-fast sae eval --out` and every other JSON result go through write_text_atomic too
    from yapo_fast.atomic import write_text_atomic

    with pytest.raises(DiskFull):
        write_text_atomic(tmp_path / "eval.json", json.dumps({"variance_explained": 0.5}))
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "eval.json").exists()
    assert _no_temporaries(tmp_path) == [] and _no_temporaries(tmp_path / "r") == []


def test_interrupted_model_conversion_leaves_no_model(tmp_path, monkeypatch):
    """The default model is converted once from its GGUF: a conversion that fails mid-write leaves
    no directory that a later run would take for a converted model."""
    import transformers

    from yapo_fast import model as model_mod

    class HalfModel:
        def save_pretrained(self, folder, **kw):
            (Path(folder) / "config.json").write_text('{"architectures": ["Llama')
            raise DiskFull("simulated failure mid-write")

    class Tok:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(model_mod, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(model_mod, "default_gguf_path", lambda: tmp_path / "m.gguf")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tok())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: HalfModel())
    with pytest.raises(DiskFull):
        model_mod.default_model_dir()
    models = tmp_path / "models"
    assert list(models.iterdir()) == []  # neither the model directory nor a temporary


def _slow_disk_save_file(tensors, filename, metadata=None):
    """safetensors' save_file on a slow disk: half the bytes, a pause, the rest (so that kills
    land inside writes, where a non-atomic writer would leave a partial file)."""
    import safetensors.torch

    blob = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(blob[: len(blob) // 2])
        f.flush()
        time.sleep(0.03)
        f.write(blob[len(blob) // 2 :])


def _write_forever(path: str, writer: int) -> None:
    import safetensors.torch

    torch.set_num_threads(1)
    safetensors.torch.save_file = _slow_disk_save_file
    i = 1000 * writer  # versions name their writer: i // 1000
    while True:
        i += 1
        SteeringVector.from_dense(torch.full((1 << 19,), float(i)), method="bipo", layer=0, info={"i": i}).save(path)


def test_kill_9_during_writes_leaves_old_or_new_never_partial(tmp_path):
    """A writer saving a 2 MiB vector in a loop (on a 'slow disk': a pause mid-file) is killed with
    SIGKILL at 12 seeded random moments: every time the file is absent or a complete vector, and
    the temporaries of the dead writers are swept."""
    ctx = multiprocessing.get_context("fork")
    path = tmp_path / "v.safetensors"
    rng = random.Random(8)
    seen_versions, swept = set(), 0
    for kill in range(12):
        proc = ctx.Process(target=_write_forever, args=(str(path), kill), daemon=True)
        proc.start()
        time.sleep(rng.uniform(0.05, 1.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        if path.exists():
            vec = load_vector(path)  # complete, valid, and internally consistent
            assert bool((vec.values == float(vec.info["i"])).all())
            seen_versions.add(vec.info["i"])
        from yapo_fast.atomic import remove_stale_temporaries

        swept += len(remove_stale_temporaries(path))
    assert _no_temporaries(tmp_path) == []
    print(f"12 kills: {swept} mid-write (their temporaries swept), versions seen {sorted(seen_versions)}")
    assert len({i // 1000 for i in seen_versions}) >= 2
    assert (
        swept >= 3
    )  # kills that landed inside a write (the temporary they left was swept)  # complete files from several killed writers
    SteeringVector.from_dense(torch.ones(4), method="bipo", layer=0).save(path)
    assert load_vector(path).d_model == 4 and _no_temporaries(tmp_path) == []


def test_temporaries_of_live_writers_are_kept(tmp_path):
    from yapo_fast.atomic import atomic_path, remove_stale_temporaries

    target = tmp_path / "x.json"
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
        assert remove_stale_temporaries(target) == [] and tmp.exists()  # ours: this process is alive
        dead = tmp_path / f".x.json.{2**22 + 7}.abc.tmp"  # above Linux's pid_max: no such process
        dead.write_text("partial")
        assert remove_stale_temporaries(target) == [dead] and not dead.exists()
    assert target.read_text() == "{}"
