"""The engine: one model, continuous batching of generation and embeddings, one iteration at a time.

Each `iteration()` does, in order:
1. take new requests and cancellations from a thread-safe inbox;
2. drop requests whose deadline passed;
3. advance the current *work* by one layer: a batched prefill of waiting prompts (when decode slots are
   free) or a packed batch of embedding documents, alternating when both wait, so a 64K-token prompt
   or a burst of long documents only delays the running streams by one layer at a time;
4. one decode step for every running sequence (slots join and leave between steps).
It returns events `(route, event)` for the HTTP processes; `route` says which one asked. Everything but
`submit` runs on one thread (the loop's worker thread).
"""

from __future__ import annotations

import functools
import logging
import queue
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from model.decode import Decoder
from model.embed import embed_steps, length_groups
from model.reformer import ReformerLM
from model.sampling import Sampler, SamplingParams, TokenChoice, choose_batch
from model.generate import finish_reason

log = logging.getLogger(__name__)


class TextStream:
    """Incremental detokenization with stop strings.

    Each new token is decoded together with a few tokens before it (so SentencePiece keeps its word-initial
    spaces and multi-byte characters are decoded whole); text is released only once it is final: an
    incomplete UTF-8 sequence, or a possible beginning of a stop string, waits for the next tokens.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), context: list[int] | None = None):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids = list(context or [])[-6:]  # the prompt's last tokens, as decoding context
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # completion text decoded so far
        self.released = 0  # characters of `text` already returned

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (newly final text, whether a stop string ended the text)."""
        self.ids.append(token)
        self._decode(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of generation (an incomplete character is replaced)."""
        self._decode(final=True)
        return self._release(final=True)[0]

    def _decode(self, final: bool) -> None:
        before = self.tokenizer.decode(self.ids[self.prefix_offset: self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def _release(self, final: bool) -> tuple[str, bool]:
        if self.stop:
            start = max(0, self.released - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                out = self.text[self.released: end] if end > self.released else ""
                self.text, self.released = self.text[:end], end
                return out, True
        end = len(self.text) if final else max(self.released, len(self.text) - self.hold)
        out = self.text[self.released: end]
        self.released = end
        return out, False


@dataclass
class GenerateJob:
    uid: str
    route: int
    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    prompt_logprobs: bool
    progress: bool
    arrival: float
    deadline: float
    sampler: Sampler = field(init=False)
    text: TextStream | None = None
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    started: float | None = None
    cancelled: bool = False


@dataclass
class EmbedJob:
    uid: str
    route: int
    documents: list[list[int]]
    pooling: str
    arrival: float
    deadline: float
    started: float | None = None
    cancelled: bool = False

    @property
    def tokens(self) -> int:
        return sum(map(len, self.documents))


@dataclass
class Work:
    """A prefill or embedding forward in progress, advanced one layer per iteration."""

    kind: str  # "prefill" | "embed"
    members: list
    steps: Iterator
    layers_total: int
    tokens: int
    started: float
    layers_done: int = 0


class Engine:
    def __init__(self, model: ReformerLM, tokenizer, *, max_running: int = 16, max_length: int | None = None,
                 prefill_batch_tokens: int = 65536, tail_capacity: int = 64, metrics=None,
                 decoder: Decoder | None = None, embedder=None):
        """`decoder` and `embedder(documents, pooling=, max_batch_tokens=)` default to torch's; the ONNX
        backend passes its own."""
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = decoder or Decoder(model, num_slots=max_running, max_length=max_length,
                                          tail_capacity=tail_capacity, prefill_batch_tokens=prefill_batch_tokens)
        self.embed_steps = embedder or functools.partial(embed_steps, model)
        self.prefill_batch_tokens = prefill_batch_tokens
        self.metrics = metrics
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[GenerateJob] = deque()
        self.waiting_embeds: deque[EmbedJob] = deque()
        self.running: dict[int, GenerateJob] = {}
        self.work: Work | None = None
        self._embeds_next = False  # alternate prefills and embedding batches when both wait

    # ---- any thread -----------------------------------------------------------------------------------
    def submit(self, request: dict) -> None:
        self.inbox.put(request)

    # ---- the engine thread ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(not self.inbox.empty() or self.waiting or self.waiting_embeds or self.running or self.work)

    def iteration(self) -> list[tuple[int, dict]]:
        events: list[tuple[int, dict]] = []
        now = time.monotonic()
        self._take_inbox(events, now)
        self._expire(events, now)
        if self.work is None:
            self.work = self._next_work(now)
        if self.work is not None:
            self._advance(events)
        if self.running:
            self._decode_step(events)
        if self.metrics:
            self.metrics.engine_state(running=len(self.running), waiting=len(self.waiting) + len(self.waiting_embeds))
        return events

    # ---- requests in and out ----------------------------------------------------------------------------
    def _take_inbox(self, events: list, now: float) -> None:
        while True:
            try:
                request = self.inbox.get_nowait()
            except queue.Empty:
                return
            kind = request["kind"]
            if kind == "cancel":
                self._cancel(request["uid"], events, reason="cancelled")
            elif kind == "generate":
                job = GenerateJob(
                    uid=request["uid"], route=request["route"], prompt_ids=list(request["prompt_ids"]),
                    params=request["params"], stop=tuple(request.get("stop", ())),
                    prompt_logprobs=request.get("prompt_logprobs", False), progress=request.get("progress", False),
                    arrival=now, deadline=now + request.get("timeout", 3600.0))
                try:
                    job.params.validate(self.model.config.vocab_size)
                    self.decoder.check_fits(len(job.prompt_ids), job.params.max_tokens)
                except ValueError as error:
                    events.append((job.route, _error(job.uid, 400, str(error))))
                    continue
                job.sampler = Sampler(job.params)
                job.text = TextStream(self.tokenizer, job.stop, context=job.prompt_ids)
                self.waiting.append(job)
            elif kind == "embed":
                self.waiting_embeds.append(EmbedJob(
                    uid=request["uid"], route=request["route"], documents=[list(d) for d in request["documents"]],
                    pooling=request.get("pooling", "mean"), arrival=now,
                    deadline=now + request.get("timeout", 3600.0)))

    def _cancel(self, uid: str, events: list, *, reason: str, timeout: bool = False) -> None:
        """Stop a request wherever it is; a decode slot is free again before the next step."""
        for pending in (self.waiting, self.waiting_embeds):
            for job in list(pending):
                if job.uid == uid:
                    pending.remove(job)
                    events.append((job.route, _finished(job, reason, timeout=timeout)))
                    return
        for slot, job in list(self.running.items()):
            if job.uid == uid:
                self._release(job)
                events.append((job.route, _finished(job, reason, timeout=timeout)))
                return
        if self.work is not None:
            for job in self.work.members:
                if job.uid == uid and not job.cancelled:
                    job.cancelled = True
                    events.append((job.route, _finished(job, reason, timeout=timeout)))
            if all(job.cancelled for job in self.work.members):
                self._abandon_work()

    def _expire(self, events: list, now: float) -> None:
        jobs = [*self.waiting, *self.waiting_embeds, *self.running.values(), *(self.work.members if self.work else [])]
        for job in jobs:
            if not job.cancelled and now > job.deadline:
                self._cancel(job.uid, events, reason="cancelled", timeout=True)

    def _release(self, job: GenerateJob) -> None:
        if job.slot is not None:
            self.running.pop(job.slot, None)
            self.decoder.free(job.slot)
            job.slot = None

    def _abandon_work(self) -> None:
        work, self.work = self.work, None
        work.steps.close()
        for job in work.members:
            if isinstance(job, GenerateJob):
                self._release(job)

    # ---- prefills and embedding batches --------------------------------------------------------------
    def _next_work(self, now: float) -> Work | None:
        can_prefill = bool(self.waiting) and self.decoder.free_slots > 0
        if not can_prefill and not self.waiting_embeds:
            return None
        embeds = bool(self.waiting_embeds) and (self._embeds_next or not can_prefill)
        self._embeds_next = not embeds
        layers = self.model.config.num_layers
        padded_length = self.model.config.padded_length
        if embeds:
            members, tokens = _take_within(self.waiting_embeds, self.prefill_batch_tokens,
                                           lambda job: job.tokens, pooling=True)
            documents = [d for job in members for d in job.documents]
            steps = self.embed_steps(documents, pooling=members[0].pooling, max_batch_tokens=self.prefill_batch_tokens)
            lengths = [len(d) for d in documents]
        else:
            members, tokens = _take_within(self.waiting, self.prefill_batch_tokens, lambda job: len(job.prompt_ids),
                                           limit=self.decoder.free_slots)
            for job in members:
                job.slot = self.decoder.allocate()
            steps = self.decoder.prefill_steps([(job.slot, job.prompt_ids) for job in members],
                                               prompt_logits=any(job.prompt_logprobs for job in members))
            lengths = [len(job.prompt_ids) for job in members]
        layers *= len(length_groups(lengths, padded_length, self.prefill_batch_tokens))
        for job in members:
            job.started = now
            if self.metrics:
                self.metrics.queue_time(now - job.arrival)
        return Work("embed" if embeds else "prefill", members, steps, layers, tokens, now)

    def _advance(self, events: list) -> None:
        work = self.work
        try:
            next(work.steps)
            work.layers_done += 1
            for job in work.members:
                if isinstance(job, GenerateJob) and job.progress and not job.cancelled:
                    events.append((job.route, {"uid": job.uid, "type": "progress", "layers_done": work.layers_done,
                                               "layers": work.layers_total, "prompt_tokens": len(job.prompt_ids)}))
            return
        except StopIteration as done:
            result = done.value
        except Exception as error:  # noqa: BLE001 - a failed forward fails its members, not the engine
            log.exception("%s failed", work.kind)
            self.work = None
            for job in work.members:
                if not job.cancelled:
                    events.append((job.route, _error(job.uid, 500, f"{work.kind} failed: {error}")))
                if isinstance(job, GenerateJob):
                    self._release(job)
            return
        self.work = None
        elapsed = time.monotonic() - work.started
        if self.metrics:
            self.metrics.prefill(work.tokens, elapsed)
        if work.kind == "embed":
            self._finish_embeddings(work, result, events)
        else:
            self._start_decoding(work, result, events)

    def _finish_embeddings(self, work: Work, vectors: torch.Tensor, events: list) -> None:
        offset = 0
        for job in work.members:
            count = len(job.documents)
            if not job.cancelled:
                events.append((job.route, {
                    "uid": job.uid, "type": "embeddings", "vectors": vectors[offset: offset + count].numpy(),
                    "usage": {"prompt_tokens": job.tokens}}))
            offset += count

    def _start_decoding(self, work: Work, result, events: list) -> None:
        logits = result.last_logits
        for index, job in enumerate(work.members):
            if job.cancelled:
                self._release(job)
                continue
            if job.prompt_logprobs:
                events.append((job.route, _prompt_logprobs(job, result.prompt_logits[index], self.tokenizer)))
            if job.params.max_tokens == 0:
                self._release(job)
                events.append((job.route, _finished(job, "length")))
                continue
            self.running[job.slot] = job
            self._accept(job, job.sampler.choose(logits[index].cpu()), events)

    # ---- decoding -------------------------------------------------------------------------------------
    def _decode_step(self, events: list) -> None:
        slots = list(self.running)
        jobs = [self.running[s] for s in slots]
        try:
            logits = self.decoder.step(slots, [job.generated[-1] for job in jobs])
            choices = choose_batch(logits, [job.sampler for job in jobs])
        except Exception as error:  # noqa: BLE001 - fail the batch's requests, keep serving
            log.exception("decode step failed")
            for job in jobs:
                self._release(job)
                events.append((job.route, _error(job.uid, 500, f"decode step failed: {error}")))
            return
        if self.metrics:
            self.metrics.decode_batch(len(slots))
        for job, choice in zip(jobs, choices):
            self._accept(job, choice, events)

    def _accept(self, job: GenerateJob, choice: TokenChoice, events: list) -> None:
        job.generated.append(choice.token)
        reason = finish_reason(job.params, self.model.config.eos_token_id, choice.token, len(job.generated))
        if reason == "stop":  # a stop token's text is not part of the completion
            text, stopped = "", False
        else:
            text, stopped = job.text.push(choice.token)
        if stopped:
            reason = "stop"
        elif reason is not None:
            text += job.text.finish()
        event = {"uid": job.uid, "type": "token", "text": text, "token": choice.token, "logprob": choice.logprob}
        if job.params.logprobs is not None:
            event["token_text"] = self.tokenizer.token_text(choice.token)
            event["top_logprobs"] = [(self.tokenizer.token_text(t), lp) for t, lp in choice.top_logprobs]
        events.append((job.route, event))
        if reason is not None:
            self._release(job)
            events.append((job.route, _finished(job, reason)))


def _take_within(pending: deque, budget: int, size, *, limit: int | None = None, pooling: bool = False):
    """Pop jobs from the front while their sizes fit the budget (the first always goes), at most `limit`,
    and for embeddings only jobs that pool the same way (one forward pools all its documents alike)."""
    members, total = [], 0
    while pending and (limit is None or len(members) < limit):
        job = pending[0]
        if members and (total + size(job) > budget or (pooling and job.pooling != members[0].pooling)):
            break
        members.append(pending.popleft())
        total += size(job)
    return members, total


def _finished(job, reason: str, *, timeout: bool = False) -> dict:
    usage = {"prompt_tokens": len(job.prompt_ids) if isinstance(job, GenerateJob) else job.tokens}
    if isinstance(job, GenerateJob):
        usage["completion_tokens"] = len(job.generated)
    return {"uid": job.uid, "type": "done", "finish_reason": reason, "timeout": timeout, "usage": usage,
            "queue_time": (job.started or time.monotonic()) - job.arrival}


def _error(uid: str, status: int, message: str) -> dict:
    return {"uid": uid, "type": "error", "status": status, "message": message}


def _prompt_logprobs(job: GenerateJob, logits: torch.Tensor, tokenizer) -> dict:
    """Log-probability of each prompt token given the ones before it (the first has none)."""
    ids = torch.tensor(job.prompt_ids)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = [None] + logprobs[:-1].gather(1, ids[1:, None])[:, 0].tolist()
    top = []
    count = job.params.logprobs or 0
    if count:
        values, indices = torch.topk(logprobs[:-1], min(count, logprobs.shape[-1]))
        top = [None] + [[(tokenizer.token_text(t), v) for t, v in zip(i.tolist(), lp.tolist())]
                        for i, lp in zip(indices, values)]
    return {"uid": job.uid, "type": "prompt", "tokens": [tokenizer.token_text(t) for t in job.prompt_ids],
            "token_logprobs": chosen, "top_logprobs": top or [None] * len(job.prompt_ids)}
