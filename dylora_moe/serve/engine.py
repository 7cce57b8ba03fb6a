"""Continuous batching for ``dylora serve``: one worker thread owns the model and decodes every
running sequence together, one token per step, with one KV cache for the whole batch.

A request arrives as prompt token ids and its sampling settings. Between two decoding steps the
worker admits waiting requests while their sequences (``n`` per request) fit in
``max_batch_size``: it runs their prompts through the model (the prefill, left-padded among
themselves), which fills their part of the KV cache and, for a mixture, routes each prompt. The
new sequences then join the running batch: both caches are left-padded to one length and stacked.
A finished or cancelled sequence leaves the batch at once (its cache rows are dropped, and so are
the leading columns that only padding still uses), so its slot is free for the next request.

Routing. With per-example routing (the default) a router's gate is computed once from the mean of
its input over the prompt's own tokens (padding is masked out) and kept for every new token, as
:meth:`DyLoRAMoE.generate` does. Here a forward hook on every router records the prefill gates and
returns each sequence's own kept gate during decoding steps: a sequence is routed from its prompt
alone, whatever shares its batch, so with greedy decoding its completion is the one-at-a-time
completion (up to float rounding, which the tests compare). With per-token routing every token is
routed as it comes; the recorded gate is then the mean gate over the prompt's tokens.

Positions come from each sequence's own token count (``position_ids``), so left padding moves no
token: a sequence sees the same positions and the same keys as alone, the padding being masked.
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests wait than ``max_queue`` allows."""


class Draining(Exception):
    """The server is shutting down and takes no new request."""


@dataclass(frozen=True)
class Sampling:
    """One request's generation settings (validated by the HTTP side)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Gate:
    """The routing a prompt was served with: per adapted layer, the weight of each routed expert."""

    routing: str  # "example" (one gate per prompt, kept for every token) or "token" (the prompt's mean)
    layers: dict[str, list[float]]

    @property
    def mean(self) -> list[float]:
        rows = torch.tensor(list(self.layers.values()))
        return rows.mean(0).tolist()

    def as_json(self) -> dict:
        mean = self.mean
        order = sorted(range(len(mean)), key=lambda e: -mean[e])
        return {"routing": self.routing, "gate": [round(w, 6) for w in mean],
                "experts": [e for e in order if mean[e] > 0],
                "layers": {name: [round(w, 6) for w in weights] for name, weights in self.layers.items()}}


# Events a request receives, in order: for each choice a Started (its gate), Text deltas, one Finished.
@dataclass
class Started:
    index: int
    gate: Gate | None


@dataclass
class Text:
    index: int
    text: str


@dataclass
class Finished:
    index: int
    reason: str  # "stop" (end of sequence or a stop string) or "length"
    completion_tokens: int


@dataclass
class Failed:
    error: BaseException


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[object], None]  # called from the worker thread; must not block
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Sequence:
    """One choice of one request: a row of the running batch."""

    request: Request
    index: int
    generator: torch.Generator | None
    length: int  # tokens of this sequence in the cache (prompt + fed tokens): the next position
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the completion already emitted
    done: bool = False


class Engine:
    """Continuous batching over one model in one worker thread (module docstring)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, max_queue: int = 64,
                 device: torch.device | str | None = None):
        if max_batch_size < 1:
            raise ConfigError(f"--max_batch_size {max_batch_size} is invalid: give at least 1.")
        if max_queue < 0:
            raise ConfigError(f"--max_queue {max_queue} is invalid: give 0 or more.")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.lm = getattr(model, "base_model", model) if hasattr(model, "routing") else model
        self.routing = getattr(model, "routing", None)
        config = self.lm.config
        self.window = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        # transformers >= 5.24 names the KV cache argument `cache`, earlier versions `past_key_values`
        self._cache_arg = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        self._routers = self._find_routers()
        self._phase: str | None = None  # "prefill": record gates; "decode": return the kept gates
        self._recorded: list[torch.Tensor | None] = [None] * len(self._routers)
        self._kept: list[torch.Tensor] | None = None  # per router (batch, 1, E): the running rows' gates
        self._hooks = [router.register_forward_hook(self._router_hook(i))
                       for i, (_, router) in enumerate(self._routers)]
        # the running batch
        self._rows: list[_Sequence] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (batch, cache length) long
        # requests waiting for a slot
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._draining = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps run (for tests and benchmarks)
        self.max_rows_seen = 0

    # ------------------------------------------------------------------ public side (any thread)
    def start(self) -> "Engine":
        try:
            self._warm_up()
        except BaseException:
            for hook in self._hooks:
                hook.remove()
            raise
        self._thread = threading.Thread(target=self._run, name="dylora-serve-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: Request) -> Request:
        with self._lock:
            if self._draining or self._stopped:
                raise Draining()
            # a slot free now (its row may have finished and not yet left the batch) takes a request beside the queue
            free = self.max_batch_size - sum(not row.done for row in self._rows)
            if len(self._waiting) >= self.max_queue + max(0, free):
                raise QueueFull()
            self._waiting.append(request)
            self._lock.notify()
        return request

    def drain(self) -> None:
        """Take no new request; those admitted or waiting still finish."""
        with self._lock:
            self._draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what still runs and end the worker thread."""
        with self._lock:
            self._draining = self._stopped = True
            for request in self._waiting:
                request.cancel()
            for row in self._rows:
                row.request.cancel()
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for hook in self._hooks:
            hook.remove()

    @property
    def draining(self) -> bool:
        return self._draining

    def load(self) -> dict:
        with self._lock:
            return {"running": sum(not row.done for row in self._rows), "waiting": len(self._waiting)}

    # ------------------------------------------------------------------ routing hooks
    def _find_routers(self) -> list[tuple[str, torch.nn.Module]]:
        if self.routing is None:
            return []
        return [(name, layer.router) for name, layer in self.model.adapted_layers()]

    def _router_hook(self, i: int):
        def hook(module, args, output):
            if self._phase == "prefill":
                self._recorded[i] = output
            elif self._phase == "decode" and self._kept is not None:
                return self._kept[i]
            return None
        return hook

    @property
    def _per_example(self) -> bool:
        return self.routing is not None and self.routing.settings.granularity == "example"

    # ------------------------------------------------------------------ worker thread
    def _warm_up(self) -> None:
        """One tiny request through prefill and a step: loads kernels, and checks the cache is a plain one."""
        with torch.no_grad():
            cache, _, _, _ = self._prefill_rows([[self.pad_id, self.pad_id]])
        for layer in cache.layers:
            if type(layer).__name__ != "DynamicLayer":
                raise ConfigError(f"dylora serve batches full-attention KV caches; this model's cache has "
                                  f"{type(layer).__name__} layers (sliding window or other), which it cannot merge.")

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._rows and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    self._fail_all(Draining())
                    return
                admitted = self._admit()
            try:
                with torch.no_grad():
                    self._drop_finished()
                    if admitted:
                        self._start(admitted)
                    if self._rows:
                        self._step()
            except Exception as err:  # a bug or an out-of-memory: fail what runs, keep serving
                log.exception("generation failed")
                running = {id(row.request) for row in self._rows}
                for request in admitted:  # admitted but not yet running: the prefill itself failed
                    if id(request) not in running:
                        request.emit(Failed(err))
                self._fail_running(err)

    def _admit(self) -> list[Request]:
        """Waiting requests, oldest first, while their sequences fit (lock held)."""
        admitted, free = [], self.max_batch_size - len(self._rows)
        while self._waiting:
            request = self._waiting[0]
            if request.cancelled.is_set():
                self._waiting.popleft()
                continue
            if request.sampling.n > free:
                break
            admitted.append(self._waiting.popleft())
            free -= request.sampling.n
        return admitted

    def _fail_all(self, err: BaseException) -> None:
        for request in list(self._waiting):
            request.emit(Failed(err))
        self._waiting.clear()
        self._fail_running(err)

    def _fail_running(self, err: BaseException) -> None:
        for request in {id(row.request): row.request for row in self._rows}.values():
            request.emit(Failed(err))
        self._rows, self._cache, self._mask, self._kept = [], None, None, None

    # ------------------------------------------------------------------ prefill and join
    def _prefill_rows(self, prompts: list[list[int]]):
        """Run left-padded prompts; returns (cache, mask, last logits, gates per router or None)."""
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        self._phase = "prefill"
        if self.routing is not None:
            self.routing.context.prompt_mask = mask.bool()  # per-example routers pool over the prompt's own tokens
        try:
            out = self.lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **{self._cache_arg: cache})
        finally:
            self._phase = None
            if self.routing is not None:
                self.routing.context.prompt_mask = None
        gates = None
        if self._routers:
            gates = []
            for recorded in self._recorded:
                if recorded.shape[1] != 1:  # per-token routing: the mean gate over the prompt's tokens
                    weights = mask.unsqueeze(-1).to(recorded.dtype)
                    recorded = (recorded * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True)
                gates.append(recorded.float())
            self._recorded = [None] * len(self._routers)
        return cache, mask, out.logits[:, -1, :].float(), gates  # the model filled the cache in place

    def _start(self, requests: list[Request]) -> None:
        cache, mask, logits, gates = self._prefill_rows([r.prompt_ids for r in requests])
        # one row per choice: a request's n sequences share its prefill
        origin = [i for i, r in enumerate(requests) for _ in range(r.sampling.n)]
        rows = []
        for i, request in enumerate(requests):
            gate = self._gate_of(gates, i) if gates is not None else None
            for choice in range(request.sampling.n):
                rows.append(_Sequence(request, choice, self._generator(request.sampling, choice),
                                      len(request.prompt_ids)))
                request.emit(Started(choice, gate))
        if len(rows) != len(requests):
            index = torch.tensor(origin, device=self.device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
            mask, logits = mask[index], logits[index]
            gates = [g[index] for g in gates] if gates is not None else None
        tokens = self._sample(logits, rows)
        self._join(rows, cache, mask, gates)
        for row, token in zip(rows, tokens):
            self._advance(row, token)
        self._drop_finished()

    def _gate_of(self, gates: list[torch.Tensor], i: int) -> Gate:
        names = [name for name, _ in self._routers]
        return Gate(self.routing.settings.granularity, {name: g[i, 0].tolist() for name, g in zip(names, gates)})

    def _generator(self, sampling: Sampling, choice: int) -> torch.Generator | None:
        if sampling.greedy:
            return None
        generator = torch.Generator(device=self.device)
        if sampling.seed is None:
            generator.seed()
        else:  # choice i of a seeded request draws from its own stream: (seed, i) -> the same sample
            generator.manual_seed((sampling.seed * 1_000_003 + choice) % 2**63)
        return generator

    def _join(self, rows: list[_Sequence], cache, mask: torch.Tensor, gates) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            self._kept = gates if self._per_example else None
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            for old, new in zip(self._cache.layers, cache.layers):
                old.keys = torch.cat([_left_pad(old.keys, width, -2), _left_pad(new.keys, width, -2)])
                old.values = torch.cat([_left_pad(old.values, width, -2), _left_pad(new.values, width, -2)])
            self._mask = torch.cat([_left_pad(self._mask, width, -1), _left_pad(mask, width, -1)])
            if self._per_example:
                self._kept = [torch.cat([a, b]) for a, b in zip(self._kept, gates)]
            self._rows = self._rows + rows
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))

    # ------------------------------------------------------------------ decoding
    def _step(self) -> None:
        ids = torch.tensor([[row.tokens[-1]] for row in self._rows], device=self.device)
        positions = torch.tensor([[row.length] for row in self._rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        self._phase = "decode"
        # Dense routing: every router returns the caller's gate at once (its first line) and the hook swaps
        # in the layer's own kept gate, so no router computes a gate it would throw away. Sparse routing
        # keeps the router's path: the layer computes only the chosen experts when no external gate is set.
        shortcut = self._kept is not None and self.routing.dense and self.routing.external_gate is None
        if shortcut:
            self.routing.external_gate = self._kept[0]
        try:
            out = self.lm(input_ids=ids, attention_mask=self._mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **{self._cache_arg: self._cache})
        finally:
            self._phase = None
            if shortcut:
                self.routing.external_gate = None
        self.steps += 1
        tokens = self._sample(out.logits[:, -1, :].float(), self._rows)
        for row, token in zip(self._rows, tokens):
            row.length += 1
            self._advance(row, token)
        self._drop_finished()

    def _sample(self, logits: torch.Tensor, rows: list[_Sequence]) -> list[int]:
        chosen = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            sampling = row.request.sampling
            if sampling.greedy:
                continue
            probs = torch.softmax(logits[i] / sampling.temperature, dim=-1)
            if sampling.top_p < 1.0:
                probs = _top_p(probs, sampling.top_p)
            chosen[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        return chosen

    def _advance(self, row: _Sequence, token: int) -> None:
        """Take one sampled token: emit the new text, and finish the row when it is done."""
        sampling = row.request.sampling
        if token in self.eos_ids:
            return self._finish(row, "stop", final=True)
        row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._emit_text(row, text[:cut], final=True)
            return self._finish(row, "stop")
        # the window: the last sampled token must still have a position to be fed at
        if len(row.tokens) >= sampling.max_tokens or (self.window and row.length >= self.window):
            self._emit_text(row, text, final=True)
            return self._finish(row, "length")
        self._emit_text(row, text, final=False)

    def _emit_text(self, row: _Sequence, text: str, final: bool) -> None:
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete character: wait for its remaining bytes
                end = len(text.rstrip("\ufffd"))
            end -= _held_back(text[:end], row.request.sampling.stop)  # may still become a stop string
        if end > row.sent:
            row.request.emit(Text(row.index, text[row.sent:end]))
            row.sent = end

    def _finish(self, row: _Sequence, reason: str, final: bool = False) -> None:
        if final and row.tokens:  # end of sequence: flush what was held back
            self._emit_text(row, self.tokenizer.decode(row.tokens, skip_special_tokens=True), final=True)
        row.done = True
        row.request.emit(Finished(row.index, reason, len(row.tokens) + (reason == "stop" and final)))

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.done and not row.request.cancelled.is_set()]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._kept = [], None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask[index]
        first = int(mask.any(0).nonzero()[0])  # columns before it are padding for every remaining row
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        self._mask = mask[:, first:]
        if self._kept is not None:
            self._kept = [g[index] for g in self._kept]
        self._rows = [self._rows[i] for i in keep]


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(tensor, pad)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one)."""
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above each
    sorted_probs[before >= top_p] = 0
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (it may still become one)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


