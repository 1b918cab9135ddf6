"""The vLLM plugin's per-step logic without an engine: request arguments, prefix-cache salts, the
token -> slot plan, and the op body against the reference, token by token."""

import pytest
import torch
from helpers import random_latent, random_sae

import yapo_fast
from yapo_fast.errors import YapoFastError
from yapo_fast.integrations.vllm_requests import UNSET, cache_salt_for, check_request_args, parse_request_args
from yapo_fast.integrations.vllm_state import SteerState
from yapo_fast.integrations.vllm_vectors import parse_spec
from yapo_fast.kernels.sparse_steer_reference import dense_steer_reference, sparse_steer_reference


def test_parse_request_args():
    assert parse_request_args(None) is UNSET
    assert parse_request_args({"other": 1}) is UNSET
    assert parse_request_args({"yapo": {"vector": "a", "multiplier": 2}}) == ("a", 2.0)
    assert parse_request_args({"yapo": "a"}) == ("a", None)
    assert parse_request_args({"yapo_vector": "a", "yapo_multiplier": "1.5"}) == ("a", 1.5)
    assert parse_request_args({"yapo": None}) is None
    assert parse_request_args({"yapo_vector": "none"}) is None
    for bad in (
        {"yapo": {"vector": "a", "multiplier": float("nan")}},
        {"yapo": {"vector": "a", "mult": 1}},
        {"yapo_vector": "a", "yapo_multiplier": "lots"},
        {"yapo": 3},
        {"yapo": {"vector": 5}},
    ):
        with pytest.raises(YapoFastError):
            parse_request_args(bad)


def test_cache_salts_separate_every_steering_state():
    salts = [cache_salt_for(s) for s in (UNSET, None, ("a", None), ("a", 1.0), ("a", 2.0), ("b", 1.0))]
    assert salts[0] is None
    assert len(set(salts[1:])) == 5


def test_front_end_check_names_the_known_vectors(monkeypatch):
    monkeypatch.setenv("YAPO_FAST_VECTORS", "honest=/x/v.safetensors@/x/sae*2,calm=/y.safetensors")
    assert parse_spec("honest=/x/v.safetensors@/x/sae*2") == {"honest": ("/x/v.safetensors", "/x/sae", 2.0)}
    check_request_args({"yapo_vector": "calm"})
    check_request_args(None)
    with pytest.raises(YapoFastError, match="unknown steering vector 'nope'.*calm, honest"):
        check_request_args({"yapo_vector": "nope"})
    for bad in ("novalue", "a=x*notanumber", "none=x", "a=x,a=y"):
        with pytest.raises(YapoFastError):
            parse_spec(bad)


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "topk"])
def test_plan_and_op_equal_reference_per_token(kind):
    torch.manual_seed(0)
    d, layer = 64, 2
    sae = random_sae(kind, d_in=d, d_sae=96, layer=layer)
    st = SteerState()
    st.installed_layers = {0, 1, 2, 3}
    lat_a = random_latent(96, 12, "mixed", seed=1)
    lat_b = random_latent(96, 12, "neg", seed=2)
    va = yapo_fast.SteeringVector.from_latent(lat_a, layer=layer, sae=sae)
    vb = yapo_fast.SteeringVector.from_latent(lat_b, layer=layer, sae=sae)
    dense = torch.randn(d)
    vc = yapo_fast.SteeringVector.from_dense(dense, method="bipo", layer=layer)
    vd = yapo_fast.SteeringVector.from_dense(torch.randn(d), method="bipo", layer=1)  # another layer
    st.register("a", va, sae, 1.5)
    st.register("b", vb, sae)
    st.register("c", vc, None, 2.0)
    st.register("d", vd, None)
    # 5 requests as vLLM lays them out: a chunk of a prefill (7 tokens), decodes (1), a full prefill (5)
    args = [
        {"yapo": {"vector": "a"}},
        None,
        {"yapo": {"vector": "b", "multiplier": -2.0}},
        {"yapo_vector": "c"},
        {"yapo": {"vector": "d"}},
    ]
    counts = [7, 1, 5, 1, 3]
    st.build_plan([st.spec_for(a) for a in args], counts)
    T = sum(counts) + 3  # padding tokens past the scheduled ones stay untouched
    hidden, residual = torch.randn(T, d), torch.randn(T, d)
    h = hidden + residual
    out = st.apply(hidden, residual, layer)
    want = h.clone()
    want[0:7] = sparse_steer_reference(h[0:7], sae, lat_a, 1.5)
    want[8:13] = sparse_steer_reference(h[8:13], sae, lat_b, -2.0)
    want[13:14] = dense_steer_reference(h[13:14], dense, 2.0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[7], h[7]) and torch.equal(out[14:], h[14:])  # unsteered rows: exact
    # layer 1 steers only request "d"; layer 0 nothing
    out1 = st.apply(hidden, residual, 1)
    assert torch.equal(out1[:14], h[:14]) and not torch.equal(out1[14:17], h[14:17])
    assert torch.equal(st.apply(hidden, residual, 0), h)
    # engine-wide vector: requests without yapo args take it; explicit None stays unsteered
    st.set_global("c", 1.0)
    st.build_plan([st.spec_for(None), st.spec_for({"yapo": None})], [2, 2])
    out = st.apply(hidden[:4], residual[:4], layer)
    torch.testing.assert_close(out[:2], dense_steer_reference(h[:2], dense, 1.0))
    assert torch.equal(out[2:], h[2:4])
    st.clear_plan()
    assert torch.equal(st.apply(hidden, residual, layer), h)


def test_unknown_name_in_worker_is_clear():
    st = SteerState()
    st.register("c", yapo_fast.SteeringVector.from_dense(torch.randn(8), method="bipo", layer=0))
    with pytest.raises(YapoFastError, match="unknown steering vector 'x'"):
        st.build_plan([("x", None)], [1])


def test_vector_payload_sends_an_sae_once():
    from yapo_fast.integrations import vllm_vectors

    sae = random_sae("jumprelu", d_in=64, d_sae=96, layer=2, seed=11)
    vec = yapo_fast.SteeringVector.from_latent(random_latent(96, 8, "mixed", seed=4), layer=2, sae=sae)
    vllm_vectors._worker_saes.pop(sae.weights_hash(), None)
    v, s = vllm_vectors.from_payload(vllm_vectors.to_payload(vec, sae, send_sae=False))
    assert s is None  # the worker asks for the SAE
    v, s = vllm_vectors.from_payload(vllm_vectors.to_payload(vec, sae))
    assert torch.equal(v.latent(), vec.latent()) and s.weights_hash() == sae.weights_hash()
    v, s2 = vllm_vectors.from_payload(vllm_vectors.to_payload(vec, sae, send_sae=False))
    assert s2 is s  # later vectors for the same SAE travel without it
    dense = yapo_fast.SteeringVector.from_dense(torch.randn(64), method="bipo", layer=1)
    v, s = vllm_vectors.from_payload(vllm_vectors.to_payload(dense))
    assert s is None and torch.equal(v.dense(), dense.dense())


def _naive_token_slots(slot_ids, counts):
    """The per-token map written the slow, obvious way (one Python step per token)."""
    out = []
    for s, c in zip(slot_ids, counts):
        out += [s] * c
    return out


@pytest.mark.parametrize("graph_safe", [False, True])  # eager (used columns) / replayed graphs (all)
def test_many_slots_one_layer_equal_reference_and_naive_map(graph_safe):
    """8 yapo vectors + a dense one + unsteered requests, chunked-prefill-like counts: each token
    gets exactly its request's vector (the reference per request), through one table step whose
    per-token rows are built by tensor ops (checked against a per-token Python loop)."""
    torch.manual_seed(1)
    d, layer = 48, 3
    sae = random_sae("jumprelu", d_in=d, d_sae=80, layer=layer, seed=5)
    st = SteerState()
    st.graph_safe = graph_safe
    latents = [random_latent(80, 10, "mixed", seed=20 + i) for i in range(8)]
    for i, lat in enumerate(latents):
        st.register(f"v{i}", yapo_fast.SteeringVector.from_latent(lat, layer=layer, sae=sae), sae)
    dense = torch.randn(d)
    st.register("c", yapo_fast.SteeringVector.from_dense(dense, method="bipo", layer=layer))
    names = ["v3", None, "v0", "c", "v7", "v3", None, "v5", "c", "v1"]
    counts = [5, 1, 1, 9, 1, 2, 3, 1, 1, 4]
    args = [{"yapo": {"vector": n}} if n else None for n in names]
    calls = []

    def extra_args_of(rid):
        calls.append(rid)
        return args[int(rid)]

    rids = [str(i) for i in range(len(names))]
    ids = st.request_slots(rids, extra_args_of)
    st.build_plan_ids(ids, counts)
    assert st.request_slots(rids, extra_args_of) == ids and calls == rids  # parsed once per request
    token = _naive_token_slots([s + 1 for s in ids], counts)
    assert st._token_buf[: sum(counts)].tolist() == token and not st._token_buf[sum(counts) :].any()
    assert len(st.tables) == 1 and st.tables[layer].used_width <= 8 * 10
    T = sum(counts)
    hidden, residual = torch.randn(T + 2, d), torch.randn(T + 2, d)
    h = hidden + residual
    out = st.apply(hidden, residual, layer)
    pos = 0
    for name, c in zip(names, counts):
        rows = slice(pos, pos + c)
        if name is None:
            assert torch.equal(out[rows], h[rows])
        elif name == "c":
            assert torch.equal(out[rows], h[rows] + dense)
        else:
            want = sparse_steer_reference(h[rows], sae, latents[int(name[1:])], 1.0)
            torch.testing.assert_close(out[rows], want, rtol=1e-5, atol=1e-5)
        pos += c
    assert torch.equal(out[T:], h[T:])
    # finished requests leave the cache; a registry change invalidates it and frees the table row
    st.forget_requests(["0", "1"])
    assert "0" not in st._requests and "2" in st._requests
    row = st.slots[("v0", 1.0)].id + 1
    st.unregister("v0")
    assert st._requests == {} and ("v0", 1.0) not in st.slots
    assert not st.tables[layer].coef[row].any() and not st.tables[layer].const[row].any()


@pytest.mark.parametrize("which", ["yapo", "bipo"])
def test_one_vector_for_the_whole_batch_equals_the_single_vector_op(which):
    """yapo_fast.patch's case (every request on one vector): the reference / the dense add on the
    scheduled tokens, padding and other layers untouched; an explicitly unsteered request in the
    batch stays exact."""
    torch.manual_seed(2)
    d, layer = 40, 1
    sae = random_sae("topk", d_in=d, d_sae=64, layer=layer, seed=9, k=8)
    lat = random_latent(64, 12, "mixed", seed=3)
    dense = torch.randn(d)
    vec = (
        yapo_fast.SteeringVector.from_latent(lat, layer=layer, sae=sae)
        if which == "yapo"
        else yapo_fast.SteeringVector.from_dense(dense, method="bipo", layer=layer)
    )
    st = SteerState()
    st.register("g", vec, sae if which == "yapo" else None, 1.5)
    st.set_global("g", None)
    counts = [3, 1, 1, 6]
    st.build_plan_ids(st.request_slots(list("abcd"), lambda rid: None), counts)
    T = sum(counts)
    hidden, residual = torch.randn(T + 1, d), torch.randn(T + 1, d)
    h = hidden + residual
    out = st.apply(hidden, residual, layer)
    want = sparse_steer_reference(h[:T], sae, lat, 1.5) if which == "yapo" else h[:T] + 1.5 * dense
    torch.testing.assert_close(out[:T], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[T:], h[T:])
    assert torch.equal(st.apply(hidden, residual, layer + 1), h)  # another layer: untouched
    st.set_global("g", None)
    ids = st.request_slots(list("ab"), lambda rid: None if rid == "a" else {"yapo": None})
    st.build_plan_ids(ids, [2, 2])
    out = st.apply(hidden[:4], residual[:4], layer)
    torch.testing.assert_close(out[:2], want[:2], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2:], h[2:4])


def test_slot_table_overflow_remaps_the_step(monkeypatch):
    """More distinct (vector, multiplier) pairs than the slot table holds: the table is rebuilt and
    the step's requests are mapped again, never to stale slot ids."""
    from yapo_fast.integrations import vllm_state

    monkeypatch.setattr(vllm_state, "MAX_SLOTS", 3)
    st = SteerState()
    dense = torch.randn(8)
    st.register("c", yapo_fast.SteeringVector.from_dense(dense, method="bipo", layer=0))
    args = {f"r{i}": {"yapo": {"vector": "c", "multiplier": float(i + 1)}} for i in range(3)}
    st.slot("c", 9.0), st.slot("c", 8.0)  # earlier requests' pairs fill the table
    generation = st._generation
    ids = st.request_slots(["r0", "r1", "r2"], args.get)  # r1's pair overflows it: rebuilt mid-step
    assert st._generation > generation
    key_of = {s.id: k for k, s in st.slots.items()}
    assert [key_of[i] for i in ids] == [("c", 1.0), ("c", 2.0), ("c", 3.0)]
    st.build_plan_ids(ids, [1, 1, 1])
    hidden, residual = torch.randn(3, 8), torch.zeros(3, 8)
    out = st.apply(hidden, residual, 0)
    torch.testing.assert_close(out, hidden + torch.tensor([[1.0], [2.0], [3.0]]) * dense)
    with pytest.raises(YapoFastError, match="distinct"):
        st.request_slots(
            [f"q{i}" for i in range(4)], lambda rid: {"yapo": {"vector": "c", "multiplier": 10.0 + int(rid[1:])}}
        )


def test_cached_tables_cover_slots_added_in_later_steps():
    """A later step that adds a slot of another layer puts that slot's row in the per-token map;
    every layer's table holds a row for every slot id (zeros where the slot is another layer's)."""
    st = SteerState()
    vc, vd = torch.randn(8), torch.randn(8)
    st.register("c", yapo_fast.SteeringVector.from_dense(vc, method="bipo", layer=0))
    st.register("d", yapo_fast.SteeringVector.from_dense(vd, method="bipo", layer=1))
    args = {
        "r0": {"yapo": {"vector": "c"}},
        "r1": None,
        "r2": {"yapo": {"vector": "c"}},
        "r3": {"yapo": {"vector": "d"}},
    }
    st.build_plan_ids(st.request_slots(["r0", "r1"], args.get), [1, 1])  # caches layer 0's table for slot c
    hidden, residual = torch.randn(2, 8), torch.zeros(2, 8)
    torch.testing.assert_close(st.apply(hidden, residual, 0), hidden + torch.stack([vc, torch.zeros(8)]))
    st.build_plan_ids(st.request_slots(["r2", "r3"], args.get), [1, 1])  # slot d is new, on layer 1
    torch.testing.assert_close(st.apply(hidden, residual, 0), hidden + torch.stack([vc, torch.zeros(8)]))
    torch.testing.assert_close(st.apply(hidden, residual, 1), hidden + torch.stack([torch.zeros(8), vd]))


def test_graph_replaying_engines_get_the_graph_safe_step():
    """A CUDA engine replaying CUDA graphs is detected (CPU engines and eager CUDA engines are not);
    its tables are allocated at full width before capture and never reallocated; the op then runs
    the full table step and equals the reference; TopK SAEs are refused with the fix."""
    from types import SimpleNamespace

    from yapo_fast.integrations.vllm_hooks import replays_cuda_graphs

    def config(device, mode, eager=False):
        return SimpleNamespace(
            device_config=SimpleNamespace(device_type=device),
            compilation_config=SimpleNamespace(cudagraph_mode=SimpleNamespace(name=mode)),
            model_config=SimpleNamespace(enforce_eager=eager),
        )

    assert replays_cuda_graphs(config("cuda", "FULL_AND_PIECEWISE"))
    assert replays_cuda_graphs(config("cuda", "PIECEWISE"))
    for no in (config("cpu", "NONE"), config("cuda", "NONE"), config("cuda", "PIECEWISE", eager=True)):
        assert not replays_cuda_graphs(no)

    d, layer = 32, 1
    st = SteerState()
    st.installed_layers = {0, 1}
    st.use_graphs(d)
    tables = dict(st.tables)
    assert set(tables) == {0, 1} and all(t.width == 4096 for t in tables.values())
    sae = random_sae("jumprelu", d_in=d, d_sae=64, layer=layer, seed=2)
    lat = random_latent(64, 10, "mixed", seed=1)
    st.register("y", yapo_fast.SteeringVector.from_latent(lat, layer=layer, sae=sae), sae)
    st.build_plan([("y", -1.0), None], [3, 2])
    assert st.tables[layer] is tables[layer]  # the captured buffers, written in place
    hidden, residual = torch.randn(6, d), torch.randn(6, d)
    h = hidden + residual
    out = st.apply(hidden, residual, layer)
    torch.testing.assert_close(out[:3], sparse_steer_reference(h[:3], sae, lat, -1.0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[3:], h[3:])  # unsteered and padding rows: row 0 of the table
    topk = random_sae("topk", d_in=d, d_sae=64, layer=layer, seed=3, k=4)
    st.register("t", yapo_fast.SteeringVector.from_latent(lat, layer=layer, sae=topk), topk)
    with pytest.raises(YapoFastError, match="TopK SAEs cannot steer an engine that replays CUDA graphs"):
        st.build_plan([("t", None)], [1])
