"""The engine core: one model, continuous batching of generation and embeddings, one iteration at a time.

The server runs it in its inference worker; `model.generate` runs it in-process. Each `iteration()`:
1. takes new requests and cancellations (typed messages, `model.messages`) from a thread-safe inbox;
2. fails requests whose deadline passed;
3. advances the current *work* by one layer: a batched prefill of waiting prompts (when decode slots are
   free) or a packed batch of embedding documents, alternating when both wait, so a 64K-token prompt
   or a burst of long documents only delays the running streams by one layer at a time;
4. runs one decode step for every running sequence (slots join and leave between steps).
It returns `(route, output)` pairs; `route` says which HTTP process asked. Everything but `submit` runs on
one thread.

Faults stay with the request that caused them: a request that cannot be read, sampled or stopped fails
alone; a batched forward that fails is retried with each member on its own, so only the request that breaks
it fails; a decode step that fails (nothing attributes it to one row) fails the sequences in it, and any
other error fails everything in flight. The engine then goes on with an empty, consistent state.
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

from .decode import ContextLengthError, Decoder
from .detokenize import TextStream
from .embed import embed_steps, length_groups
from .messages import (Cancel, EmbedRequest, EngineInput, EngineOutput, ErrorCode, Failed, Finished, FinishReason,
                       GenerateRequest, Embeddings, Progress, PromptLogprobs, Token)
from .reformer import ReformerLM
from .sampling import Sampler, SamplingParams, TokenChoice

log = logging.getLogger(__name__)

Events = list[tuple[int, EngineOutput]]


@dataclass(eq=False)
class GenerateJob:
    request: GenerateRequest
    arrival: float
    deadline: float
    sampler: Sampler
    text: TextStream | None
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    started: float | None = None
    cancelled: bool = False
    alone: bool = False  # prefill it in a batch of its own (its batch failed once)

    @property
    def uid(self) -> str:
        return self.request.uid

    @property
    def route(self) -> int:
        return self.request.route

    @property
    def tokens(self) -> int:
        return len(self.request.prompt_ids)


@dataclass(eq=False)
class EmbedJob:
    request: EmbedRequest
    arrival: float
    deadline: float
    started: float | None = None
    cancelled: bool = False
    alone: bool = False

    uid = GenerateJob.uid
    route = GenerateJob.route

    @property
    def tokens(self) -> int:
        return sum(map(len, self.request.documents))


Job = GenerateJob | EmbedJob


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


def finish_reason(params: SamplingParams, eos_token_id: int | None, token: int, generated: int) -> FinishReason | None:
    """Why a sequence ends after emitting `token` as its `generated`-th token, or None to go on."""
    if token in params.stop_token_ids or (token == eos_token_id and not params.ignore_eos):
        return FinishReason.STOP
    if generated >= params.max_tokens:
        return FinishReason.LENGTH
    return None


class Engine:
    def __init__(self, model: ReformerLM, tokenizer=None, *, max_running: int = 16, max_length: int | None = None,
                 prefill_batch_tokens: int = 65536, tail_capacity: int = 64, metrics=None,
                 decoder: Decoder | None = None, embedder=None):
        """`decoder` and `embedder(documents, pooling=, max_batch_tokens=)` default to torch's; the ONNX
        backend passes its own. Without a tokenizer, tokens carry no text and stop strings are refused."""
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
        self.prefills = 0  # forwards started over prompts (tests and benchmarks count them)
        self._embeds_next = False  # alternate prefills and embedding batches when both wait

    # ---- any thread -----------------------------------------------------------------------------------
    def submit(self, message: EngineInput) -> None:
        if not isinstance(message, GenerateRequest | EmbedRequest | Cancel):
            raise TypeError(f"the engine takes GenerateRequest, EmbedRequest or Cancel, not {type(message).__name__}")
        self.inbox.put(message)

    # ---- the engine thread ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(not self.inbox.empty() or self.waiting or self.waiting_embeds or self.running or self.work)

    def iteration(self) -> Events:
        events: Events = []
        try:
            self._iteration(events)
        except Exception as error:  # noqa: BLE001 - a bug must not leave requests hanging or slots taken
            log.exception("engine iteration failed; failing every request in flight")
            self.fail_all(events, 500, f"internal engine error: {error}", ErrorCode.INTERNAL)
        if self.metrics:
            self.metrics.engine_state(running=len(self.running), waiting=len(self.waiting) + len(self.waiting_embeds))
        return events

    def fail_all(self, events: Events, status: int, message: str, code: ErrorCode) -> None:
        """End every request in flight with one error and return the engine to an empty state."""
        if self.work is not None:
            self.work.steps.close()
        jobs = [*self.waiting, *self.waiting_embeds, *self.running.values(), *(self.work.members if self.work else [])]
        self.work = None
        self.waiting.clear()
        self.waiting_embeds.clear()
        self.running.clear()
        for job in jobs:
            if isinstance(job, GenerateJob):
                self._release(job)
            if not job.cancelled:
                job.cancelled = True
                events.append((job.route, Failed(job.uid, status, message, code)))

    def _iteration(self, events: Events) -> None:
        now = time.monotonic()
        self._take_inbox(events, now)
        self._expire(events, now)
        if self.work is None:
            self.work = self._next_work(now)
        if self.work is not None:
            self._advance(events)
        if self.running:
            self._decode_step(events)

    # ---- requests in and out ----------------------------------------------------------------------------
    def _take_inbox(self, events: Events, now: float) -> None:
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, Cancel):
                self._cancel(message.uid, events, Finished, FinishReason.ABORT)
                continue
            deadline = now + message.timeout if message.timeout is not None else float("inf")
            try:
                if isinstance(message, GenerateRequest):
                    self.waiting.append(self._generate_job(message, now, deadline))
                else:
                    self.waiting_embeds.append(EmbedJob(message, now, deadline))
            except ValueError as error:
                code = ErrorCode.CONTEXT_LENGTH if isinstance(error, ContextLengthError) else ErrorCode.INVALID_REQUEST
                events.append((message.route, Failed(message.uid, 400, str(error), code)))
            except Exception as error:  # noqa: BLE001 - this request alone is at fault
                log.exception("request %s could not be read", message.uid)
                events.append((message.route, Failed(message.uid, 500, f"request failed: {error}", ErrorCode.INTERNAL)))

    def _generate_job(self, request: GenerateRequest, now: float, deadline: float) -> GenerateJob:
        request.params.validate(self.model.config.vocab_size)
        self.decoder.check_fits(len(request.prompt_ids), request.params.max_tokens)
        if request.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        text = TextStream(self.tokenizer, request.stop, context=list(request.prompt_ids)) if self.tokenizer else None
        return GenerateJob(request, now, deadline, Sampler(request.params), text)

    def _cancel(self, uid: str, events: Events, outcome, *args) -> None:
        """End a request wherever it is, with `outcome(uid, *args)`; a decode slot is free before the next step."""
        for pending in (self.waiting, self.waiting_embeds):
            for job in pending:
                if job.uid == uid:
                    pending.remove(job)
                    events.append((job.route, self._ending(job, outcome, *args)))
                    return
        for job in list(self.running.values()):
            if job.uid == uid:
                self._release(job)
                events.append((job.route, self._ending(job, outcome, *args)))
                return
        if self.work is not None:
            for job in self.work.members:
                if job.uid == uid and not job.cancelled:
                    job.cancelled = True
                    events.append((job.route, self._ending(job, outcome, *args)))
            if all(job.cancelled for job in self.work.members):
                self._abandon_work()

    @staticmethod
    def _ending(job: Job, outcome, *args) -> EngineOutput:
        if outcome is Finished:
            return _finished(job, *args)
        return outcome(job.uid, *args)

    def _expire(self, events: Events, now: float) -> None:
        jobs = [*self.waiting, *self.waiting_embeds, *self.running.values(), *(self.work.members if self.work else [])]
        for job in jobs:
            if not job.cancelled and now > job.deadline:
                self._cancel(job.uid, events, Failed, 504, "The request deadline passed after "
                             f"{now - job.arrival:.1f} s.", ErrorCode.TIMEOUT)

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
        padded_length = self.model.config.padded_length
        if embeds:
            members, tokens = _take_within(self.waiting_embeds, self.prefill_batch_tokens, pooling=True)
            documents = [list(d) for job in members for d in job.request.documents]
            steps = self.embed_steps(documents, pooling=members[0].request.pooling,
                                     max_batch_tokens=self.prefill_batch_tokens)
            lengths = [len(d) for d in documents]
        else:
            members, tokens = _take_within(self.waiting, self.prefill_batch_tokens, limit=self.decoder.free_slots)
            for job in members:
                job.slot = self.decoder.allocate()
            steps = self.decoder.prefill_steps([(job.slot, list(job.request.prompt_ids)) for job in members],
                                               prompt_logits=any(job.request.prompt_logprobs for job in members))
            lengths = [job.tokens for job in members]
            self.prefills += 1
        layers = self.model.config.num_layers * len(length_groups(lengths, padded_length, self.prefill_batch_tokens))
        for job in members:
            job.started = now
            if self.metrics:
                self.metrics.queue_time(now - job.arrival)
        return Work("embed" if embeds else "prefill", members, steps, layers, tokens, now)

    def _advance(self, events: Events) -> None:
        work = self.work
        try:
            next(work.steps)
            work.layers_done += 1
            for job in work.members:
                if isinstance(job, GenerateJob) and job.request.progress and not job.cancelled:
                    events.append((job.route, Progress(job.uid, work.layers_done, work.layers_total, job.tokens)))
            return
        except StopIteration as done:
            result = done.value
        except Exception as error:  # noqa: BLE001 - a failed forward fails its members, not the engine
            self._forward_failed(work, error, events)
            return
        self.work = None
        if self.metrics:
            self.metrics.prefill(work.tokens, time.monotonic() - work.started)
        if work.kind == "embed":
            self._finish_embeddings(work, result, events)
        else:
            self._start_decoding(work, result, events)

    def _forward_failed(self, work: Work, error: Exception, events: Events) -> None:
        """A batch that fails is split: each member is retried alone, so only the one that breaks it fails."""
        self.work = None
        live = [job for job in work.members if not job.cancelled]
        for job in work.members:
            if isinstance(job, GenerateJob):
                self._release(job)
        if len(live) > 1:
            log.warning("%s of %d requests failed (%s); retrying each alone", work.kind, len(live), error)
            pending = self.waiting_embeds if work.kind == "embed" else self.waiting
            for job in reversed(live):
                job.alone = True
                pending.appendleft(job)
            return
        log.exception("%s failed", work.kind, exc_info=error)
        for job in live:
            events.append((job.route, Failed(job.uid, 500, f"{work.kind} failed: {error}", ErrorCode.INTERNAL)))

    def _finish_embeddings(self, work: Work, vectors: torch.Tensor, events: Events) -> None:
        offset = 0
        for job in work.members:
            count = len(job.request.documents)
            if not job.cancelled:
                block = vectors[offset: offset + count].float().numpy()
                events.append((job.route, Embeddings(job.uid, block, job.tokens)))
            offset += count

    def _start_decoding(self, work: Work, result, events: Events) -> None:
        for index, job in enumerate(work.members):
            if job.cancelled:
                self._release(job)
                continue
            if job.request.prompt_logprobs:
                events.append((job.route, _prompt_logprobs(job, result.prompt_logits[index])))
            if job.request.params.max_tokens == 0:
                self._release(job)
                events.append((job.route, _finished(job, FinishReason.LENGTH)))
                continue
            self.running[job.slot] = job
            self._accept(job, result.last_logits[index], events)

    # ---- decoding -------------------------------------------------------------------------------------
    def _decode_step(self, events: Events) -> None:
        jobs = list(self.running.values())
        try:
            logits = self.decoder.step([job.slot for job in jobs], [job.generated[-1] for job in jobs])
            rows = logits.detach().float().cpu()  # one device-to-host copy for the batch
        except Exception as error:  # noqa: BLE001 - no row is to blame: fail the batch, keep serving
            log.exception("decode step failed")
            for job in jobs:
                self._release(job)
                events.append((job.route, Failed(job.uid, 500, f"decode step failed: {error}", ErrorCode.INTERNAL)))
            return
        if self.metrics:
            self.metrics.decode_batch(len(jobs))
        for job, row in zip(jobs, rows):
            self._accept(job, row, events)

    def _accept(self, job: GenerateJob, logits: torch.Tensor, events: Events) -> None:
        """Sample the next token of one sequence and apply its stopping rules; a failure here is its own."""
        try:
            choice = job.sampler.choose(logits.detach().float().cpu())
            token, reason = self._token(job, choice)
        except Exception as error:  # noqa: BLE001 - this request's sampling or stop rule, not the batch's
            log.exception("sampling failed for %s", job.uid)
            self._release(job)
            events.append((job.route, Failed(job.uid, 500, f"sampling failed: {error}", ErrorCode.INTERNAL)))
            return
        events.append((job.route, token))
        if reason is not None:
            self._release(job)
            events.append((job.route, _finished(job, reason)))

    def _token(self, job: GenerateJob, choice: TokenChoice) -> tuple[Token, FinishReason | None]:
        job.generated.append(choice.token)
        reason = finish_reason(job.request.params, self.model.config.eos_token_id, choice.token, len(job.generated))
        text = ""
        if job.text is not None and reason is not FinishReason.STOP:  # a stop token's text is not completion text
            text, stopped = job.text.push(choice.token)
            if stopped:
                reason = FinishReason.STOP
            elif reason is not None:
                text += job.text.finish()
        return Token(job.uid, choice.token, text, choice.logprob, choice.top_logprobs), reason


def _take_within(pending: deque, budget: int, *, limit: int | None = None, pooling: bool = False):
    """Pop jobs from the front while their sizes fit the budget (the first always goes), at most `limit`;
    for embeddings only jobs that pool the same way; a job marked `alone` goes alone."""
    members, total = [], 0
    while pending and (limit is None or len(members) < limit):
        job = pending[0]
        if members and (job.alone or members[0].alone or total + job.tokens > budget
                        or (pooling and job.request.pooling != members[0].request.pooling)):
            break
        members.append(pending.popleft())
        total += job.tokens
    return members, total


def _finished(job: Job, reason: FinishReason) -> Finished:
    completion = len(job.generated) if isinstance(job, GenerateJob) else 0
    return Finished(job.uid, reason, job.tokens, completion)


def _prompt_logprobs(job: GenerateJob, logits: torch.Tensor) -> PromptLogprobs:
    """Log-probability of each prompt token given the ones before it (the first has none)."""
    ids = torch.tensor(job.request.prompt_ids)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = [None] + logprobs[:-1].gather(1, ids[1:, None])[:, 0].tolist()
    count = job.request.params.logprobs or 0
    top: list = [None] * len(ids)
    if count:
        values, indices = torch.topk(logprobs[:-1], min(count, logprobs.shape[-1]))
        top = [None] + [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
    return PromptLogprobs(job.uid, chosen, top)
