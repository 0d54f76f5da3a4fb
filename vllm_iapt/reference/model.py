"""The reference IAPT model on top of a frozen transformers causal LM of a checked
family (:data:`vllm_iapt.architectures.CHECKED_ARCHITECTURES`).

It trains adapters and is the numerical reference the vLLM engine must match.
Soft rows are handled here and nowhere else on this side: callers pass the user's
token ids; the model prepends ``m`` placeholder rows (docs/iapt.md, section 2), replaces
their input to every generator layer with ``S`` (docs/iapt.md, section 3) through forward
pre-hooks on the decoder layers, and returns logits for the user's rows only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from vllm_iapt.architectures import checked_architecture, decoder_layers
from vllm_iapt.adapter import IAPTAdapter, load_adapter, save_adapter
from vllm_iapt.config import AdapterConfig
from vllm_iapt.generator import LayerGenerator

#: Token id written into the soft slots. Any id works: layer 0 always has a
#: generator, so the slots' embeddings are replaced before anything reads them.
DEFAULT_PLACEHOLDER_ID = 0


@dataclass
class GenerationOutput:
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)  # raw log-softmax of each chosen token


class IAPTForCausalLM(nn.Module):
    """A frozen causal LM plus (optionally) one IAPT adapter's generators.

    With no adapter the base model runs untouched (no hooks, no soft rows), so
    base-model behaviour is bit-identical to the plain transformers model.
    """

    def __init__(self, base: PreTrainedModel, adapter_config: AdapterConfig | None = None) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.adapter_config = adapter_config
        self.generators = nn.ModuleDict()
        self._pool_mask: torch.Tensor | None = None  # set only while a prefill runs
        self._hooks = []
        if adapter_config is not None:
            cfg = base.config
            if adapter_config.hidden_size != cfg.hidden_size or adapter_config.num_hidden_layers != cfg.num_hidden_layers:
                raise ValueError(
                    f"adapter is for d={adapter_config.hidden_size}, L={adapter_config.num_hidden_layers}; "
                    f"base model has d={cfg.hidden_size}, L={cfg.num_hidden_layers}")
            for layer in adapter_config.generator_layers:
                self.generators[str(layer)] = LayerGenerator(
                    adapter_config.hidden_size, adapter_config.bottleneck_dim, adapter_config.num_soft_tokens,
                    adapter_config.activation, adapter_config.numerator_degree, adapter_config.denominator_degree,
                )
                hook = self._decoder_layers()[layer].register_forward_pre_hook(self._make_hook(layer))
                self._hooks.append(hook)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        base_model: str | os.PathLike | PreTrainedModel,
        adapter: str | os.PathLike | IAPTAdapter | None = None,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> "IAPTForCausalLM":
        if not isinstance(base_model, PreTrainedModel):
            base_model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
        base_model.eval()
        if adapter is None:
            return cls(base_model)
        if not isinstance(adapter, IAPTAdapter):
            adapter = load_adapter(
                adapter, hidden_size=base_model.config.hidden_size,
                num_hidden_layers=base_model.config.num_hidden_layers)
        model = cls(base_model, adapter.config)
        model.load_adapter_tensors(adapter.tensors)
        return model

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The generators' tensors under the names of docs/iapt.md, section 6."""
        out = {}
        for layer, g in self.generators.items():
            p = f"layers.{layer}."
            out[p + "down.weight"] = g.down.weight
            out[p + "down.bias"] = g.down.bias
            out[p + "pool.query"] = g.query
            out[p + "up.weight"] = g.up.weight
            out[p + "up.bias"] = g.up.bias
            if g.numerator is not None:
                out[p + "act.numerator"] = g.numerator
                out[p + "act.denominator"] = g.denominator
        return out

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.adapter_tensors()
        if set(own) != set(tensors):
            raise ValueError(f"tensor names differ: {sorted(set(own) ^ set(tensors))}")
        for k, t in own.items():
            t.copy_(tensors[k].to(t.dtype))

    def save_adapter(self, path: str | os.PathLike, torch_dtype: str | None = None) -> None:
        assert self.adapter_config is not None, "no adapter to save"
        cfg = self.adapter_config
        if torch_dtype is not None:
            cfg = cfg.model_copy(update={"torch_dtype": torch_dtype})
        save_adapter(path, cfg, self.adapter_tensors())

    # ------------------------------------------------------------------ forward
    @property
    def num_soft_tokens(self) -> int:
        return 0 if self.adapter_config is None else self.adapter_config.num_soft_tokens

    def _decoder_layers(self) -> nn.ModuleList:
        config = self.base.config
        return decoder_layers(self.base, checked_architecture(config.architectures or [type(self.base).__name__]))

    def _make_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple):
            if self._pool_mask is None:  # decode step: the soft rows' K/V are cached
                return None
            h = args[0]
            m = self.num_soft_tokens
            s = self.generators[str(layer)](h, self._pool_mask)  # (B, m, d) float32
            return (torch.cat([s.to(h.dtype), h[:, m:]], dim=1), *args[1:])

        return hook

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        instruction_lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        placeholder_id: int = DEFAULT_PLACEHOLDER_ID,
    ) -> dict[str, torch.Tensor]:
        """Training/scoring forward over right-padded ``(B, T)`` user tokens.

        ``instruction_lengths[b]`` is the number of leading tokens of row ``b`` that
        form its instruction (pooled by the generators; default: every non-padding
        token). ``labels`` follow transformers' convention (-100 = ignored) and are
        aligned with ``input_ids``. Returns ``logits`` aligned with ``input_ids``
        (soft rows dropped) and ``loss`` when labels are given.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        m = self.num_soft_tokens
        if m == 0:
            logits = self.base(input_ids=input_ids, attention_mask=attention_mask).logits
        else:
            bsz, seq = input_ids.shape
            if instruction_lengths is None:
                instruction_lengths = attention_mask.sum(dim=1)
            soft = torch.full((bsz, m), placeholder_id, dtype=input_ids.dtype, device=input_ids.device)
            ids = torch.cat([soft, input_ids], dim=1)
            am = torch.cat([torch.ones_like(soft), attention_mask], dim=1)
            cols = torch.arange(m + seq, device=input_ids.device)
            pool = (cols >= m) & (cols < m + instruction_lengths.to(input_ids.device).unsqueeze(1))
            self._pool_mask = pool
            try:
                logits = self.base(input_ids=ids, attention_mask=am).logits[:, m:]
            finally:
                self._pool_mask = None
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return out

    # --------------------------------------------------------------- generation
    def _step(self, ids: torch.Tensor, cache: DynamicCache | None, pool: torch.Tensor | None) -> torch.Tensor:
        self._pool_mask = pool
        try:
            out = self.base(input_ids=ids, past_key_values=cache, use_cache=cache is not None)
        finally:
            self._pool_mask = None
        return out.logits[0, -1].float()

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        placeholder_id: int = DEFAULT_PLACEHOLDER_ID,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> GenerationOutput:
        """Greedy (``temperature == 0``) or sampled generation for one prompt.

        With ``use_cache`` the generators run once, at prefill, and decode steps
        reuse the soft rows' cached K/V (what the engine does). Without it every
        step recomputes the whole sequence from scratch, pooling the instruction
        rows only: the two must agree.
        The penalties follow vLLM's definitions (repetition over the user's prompt
        and the generated tokens, presence and frequency over the generated tokens);
        ``logprobs`` stay the raw, unpenalised ones, as vLLM reports them.
        """
        if not prompt_ids:
            raise ValueError("prompt must have at least one token")
        device = next(self.base.parameters()).device
        m = self.num_soft_tokens
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        full = [placeholder_id] * m + list(prompt_ids)
        n_pool = len(full)
        cache = DynamicCache() if use_cache else None
        result = GenerationOutput([])
        next_input = full
        for step in range(max_new_tokens):
            if use_cache and step > 0:
                ids, pool = torch.tensor([next_input[-1:]], device=device), None
            else:
                ids = torch.tensor([next_input], device=device)
                cols = torch.arange(len(next_input), device=device)
                pool = ((cols >= m) & (cols < n_pool)).unsqueeze(0) if m else None
            logits = self._step(ids, cache, pool)
            logprobs = torch.log_softmax(logits, dim=-1)
            logits = penalize(logits, list(prompt_ids), result.token_ids, repetition_penalty, presence_penalty,
                              frequency_penalty)
            if temperature == 0.0:
                tok = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                tok = int(torch.multinomial(probs, 1, generator=gen))
            result.token_ids.append(tok)
            result.logprobs.append(float(logprobs[tok]))
            next_input = next_input + [tok]
            if eos_token_id is not None and tok == eos_token_id:
                break
        return result


def penalize(logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int], repetition: float,
             presence: float, frequency: float) -> torch.Tensor:
    """vLLM's sampling penalties on one row of logits (``apply_penalties``)."""
    if repetition == 1.0 and presence == 0.0 and frequency == 0.0:
        return logits
    vocab = logits.numel()
    counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab)[:vocab].to(logits)
    seen = counts > 0
    seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
    logits = torch.where(seen & (logits > 0), logits / repetition, torch.where(seen, logits * repetition, logits))
    return logits - frequency * counts - presence * (counts > 0).to(logits)
