"""What a request asks for, read where vLLM sees it: the front end (LLM / API server) validates
the steering arguments at submission, the engine core salts the prefix cache with them, the
workers map them to prepared slots (integrations/vllm_state.py). Nothing here imports vLLM.

Request -> vector:
- ``extra_args={"yapo": {"vector": name, "multiplier": m}}`` (offline ``SamplingParams``), or the
  flat ``extra_args={"yapo_vector": name, "yapo_multiplier": m}`` (``vllm_xargs`` of the OpenAI
  server, whose values must be scalars). ``vector: None`` (or "none") = explicitly unsteered.
- no yapo arguments: the engine-wide vector set by ``yapo_fast.patch(llm, ...)``, if any.
"""

from __future__ import annotations

from yapo_fast.errors import YapoFastError, check_multiplier

GLOBAL_NAME = "__patch__"  # the engine-wide vector of yapo_fast.patch(llm, vector)
UNSET = object()  # request carries no yapo arguments


def parse_request_args(extra_args) -> "object | None | tuple[str, float | None]":
    """UNSET (no yapo args), None (explicitly unsteered) or (name, multiplier or None)."""
    if not extra_args:
        return UNSET
    spec = extra_args.get("yapo", UNSET)
    if spec is UNSET:
        if "yapo_vector" not in extra_args and "yapo_multiplier" not in extra_args:
            return UNSET
        spec = {"vector": extra_args.get("yapo_vector"), "multiplier": extra_args.get("yapo_multiplier")}
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"vector": spec}
    if not isinstance(spec, dict):
        raise YapoFastError(
            f"extra_args['yapo'] must be a dict like {{'vector': 'name', 'multiplier': 1.0}}, got {type(spec).__name__}"
        )
    unknown = set(spec) - {"vector", "multiplier"}
    if unknown:
        raise YapoFastError(
            f"unknown keys {sorted(unknown)} in the yapo request arguments; use 'vector' and 'multiplier'"
        )
    name = spec.get("vector")
    if name is None or (isinstance(name, str) and name.lower() in ("", "none")):
        if spec.get("multiplier") is not None:  # a multiplier for no vector would be silently dropped
            raise YapoFastError(
                "a yapo multiplier was given without a vector: name one (yapo_vector / 'vector') or drop the multiplier"
            )
        return None
    if not isinstance(name, str):
        raise YapoFastError(f"the yapo vector must be named by a string, got {name!r}")
    m = spec.get("multiplier")
    if m is not None:
        if isinstance(m, str):
            try:
                m = float(m)
            except ValueError:
                raise YapoFastError(f"yapo multiplier must be a number, got {m!r}") from None
        m = check_multiplier(m, "yapo multiplier")
    return (name, m)


def cache_salt_for(spec) -> str | None:
    """What a request's steering adds to its prefix-cache salt (None: nothing), so KV computed
    under one vector/multiplier is never reused by a request steered differently or unsteered."""
    if spec is UNSET:
        return None
    if spec is None:
        return "yapo:none"
    name, m = spec
    return f"yapo:{name}:{'default' if m is None else repr(float(m))}"


# ---- front end: names it can accept ----------------------------------------------------------
_front_names: set[str] = set()  # names registered from this (front-end) process


def known_names() -> set[str]:
    from yapo_fast.integrations.vllm_vectors import startup_names

    return startup_names() | _front_names


def add_front_name(name: str) -> None:
    _front_names.add(name)


def drop_front_name(name: str) -> None:
    _front_names.discard(name)


def check_request_args(extra_args) -> None:
    """Front-end check of a request's steering arguments; raises YapoFastError (a ValueError,
    which vLLM's server answers with HTTP 400) naming the problem and the fix."""
    spec = parse_request_args(extra_args)
    if not isinstance(spec, tuple):
        return
    names = known_names()
    if spec[0] not in names:
        have = ", ".join(sorted(names)) or "none"
        raise YapoFastError(
            f"unknown steering vector {spec[0]!r}: this engine serves {have}. Register it "
            f"(yapo_fast.register_vector, or YAPO_FAST_VECTORS / yapo-fast serve --vector name=path) or "
            "fix the name"
        )
