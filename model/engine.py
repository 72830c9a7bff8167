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

from .blocks import never_lendable
from .decode import ContextLengthError, Decoder
from .detokenize import TextStream
from .embed import embed_steps, length_groups
from .penalties import LogitsAdjuster
from .messages import (Cancel, EmbedRequest, EngineInput, EngineOutput, ErrorCode, Failed, Finished, FinishReason,
                       GenerateRequest, Embeddings, Progress, PromptLogprobs, Token)
from .reformer import ReformerLM
from .sampling import Sampler, SamplingParams, TokenChoice, with_chosen

log = logging.getLogger(__name__)

Events = list[tuple[int, EngineOutput]]


@dataclass(eq=False)
class Choice:
    """One of a generation request's n sequences, in a decode slot of its own."""

    job: GenerateJob
    index: int
    sampler: Sampler
    text: TextStream | None
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    done: bool = False


@dataclass(eq=False)
class GenerateJob:
    request: GenerateRequest
    arrival: float
    deadline: float
    choices: list[Choice] = field(default_factory=list)
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

    @property
    def slots(self) -> int:
        return self.request.n

    @property
    def reserve(self) -> int:
        """Positions each choice's cache holds: the prompt and every token it may generate."""
        return len(self.request.prompt_ids) + self.request.params.max_tokens


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
    slots = 0
    choices = ()

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
                 prefill_batch_tokens: int = 65536, tail_capacity: int = 64, cache_blocks: int | None = None,
                 metrics=None, decoder: Decoder | None = None, embedder=None):
        """`decoder` and `embedder(documents, pooling=, max_batch_tokens=, contexts=)` default to torch's; the ONNX
        backend passes its own. Without a tokenizer, tokens carry no text and stop strings are refused."""
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = decoder or Decoder(model, num_slots=max_running, max_length=max_length,
                                          tail_capacity=tail_capacity, prefill_batch_tokens=prefill_batch_tokens,
                                          cache_blocks=cache_blocks)
        self.adjuster = LogitsAdjuster(self.decoder.num_slots, model.config.vocab_size, self.decoder.device)
        self.embed_steps = embedder or functools.partial(embed_steps, model)
        self.prefill_batch_tokens = prefill_batch_tokens
        self.metrics = metrics
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[GenerateJob] = deque()
        self.waiting_embeds: deque[EmbedJob] = deque()
        self.running: dict[int, Choice] = {}  # decode slot -> the choice decoding in it
        self.work: Work | None = None
        self.taken: list[Job] = []  # members of the next work while it is being set up (see _next_work)
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
        if self.metrics:  # running, as vLLM counts it: in a prefill (or an embedding forward) too
            started = [*(self.work.members if self.work else []), *self.taken]
            in_forward = sum(len(job.choices) if isinstance(job, GenerateJob) else 1 for job in started)
            self.metrics.engine_state(running=len(self.running) + in_forward,
                                      waiting=len(self.waiting) + len(self.waiting_embeds),
                                      cache_usage=self.decoder.usage)
        return events

    def _jobs(self) -> list[Job]:
        """Every request in flight, once each."""
        jobs = [*self.waiting, *self.waiting_embeds, *(c.job for c in self.running.values()),
                *(self.work.members if self.work else []), *self.taken]
        return list({id(job): job for job in jobs}.values())

    def fail_all(self, events: Events, status: int, message: str, code: ErrorCode) -> None:
        """End every request in flight with one error and return the engine to an empty state."""
        jobs = self._jobs()
        if self.work is not None:
            self.work.steps.close()
        self.work, self.taken = None, []
        self.waiting.clear()
        self.waiting_embeds.clear()
        for job in jobs:
            self._release(job)
            if not job.cancelled:
                job.cancelled = True
                events.append((job.route, Failed(job.uid, status, message, code)))
        self.running.clear()

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
        request.params.validate(self.model.config.vocab_size, self.model.config.eos_token_id)
        self.decoder.check_fits(len(request.prompt_ids), request.params.max_tokens)
        if not 1 <= request.n <= self.decoder.num_slots:
            raise ValueError(f"'n' must be in 1..{self.decoder.num_slots} (the decode slots), got {request.n}")
        tokens = len(request.prompt_ids) + request.params.max_tokens
        blocks = self.decoder.blocks
        refusal = never_lendable(request.n, tokens, blocks.num_blocks, blocks.block_size)
        if refusal:
            raise ContextLengthError(refusal)
        if (request.stop or not request.skip_special_tokens) and self.tokenizer is None:
            raise ValueError("stop strings and special-token text need a tokenizer")
        job = GenerateJob(request, now, deadline)
        for index in range(request.n):
            text = TextStream(self.tokenizer, request.stop, context=list(request.prompt_ids),
                              include_stop=request.include_stop_str_in_output,
                              skip_special=request.skip_special_tokens) if self.tokenizer else None
            job.choices.append(Choice(job, index, Sampler(request.params.for_choice(index)), text))
        return job

    def _cancel(self, uid: str, events: Events, outcome, *args) -> None:
        """End a request wherever it is, with `outcome(uid, *args)`; its decode slots are free before the next
        step."""
        for job in self._jobs():
            if job.uid != uid or job.cancelled:
                continue
            for pending in (self.waiting, self.waiting_embeds):
                if job in pending:
                    pending.remove(job)
            job.cancelled = True
            in_work = self.work is not None and job in self.work.members
            if not in_work:  # a prefill in progress still writes into its slots: they go when it ends
                self._release(job)
            events.append((job.route, Finished(job.uid, *args, job.tokens, _completion_tokens(job))
                           if outcome is Finished else outcome(job.uid, *args)))
            if in_work and all(member.cancelled for member in self.work.members):
                self._abandon_work()
            return

    def _expire(self, events: Events, now: float) -> None:
        for job in self._jobs():
            if not job.cancelled and now > job.deadline:
                self._cancel(job.uid, events, Failed, 504, "The request deadline passed after "
                             f"{now - job.arrival:.1f} s.", ErrorCode.TIMEOUT)

    def _release(self, job: Job) -> None:
        for choice in job.choices:
            self._release_choice(choice)

    def _release_choice(self, choice: Choice) -> None:
        if choice.slot is not None:
            self.running.pop(choice.slot, None)
            self.adjuster.free(choice.slot)
            self.decoder.free(choice.slot)
            choice.slot = None

    def _abandon_work(self) -> None:
        work, self.work = self.work, None
        work.steps.close()
        for job in work.members:
            self._release(job)

    # ---- prefills and embedding batches --------------------------------------------------------------
    def _next_work(self, now: float) -> Work | None:
        can_prefill = bool(self.waiting) and self.decoder.room_for([(self.waiting[0].slots, self.waiting[0].reserve)])
        if not can_prefill and not self.waiting_embeds:
            return None
        embeds = bool(self.waiting_embeds) and (self._embeds_next or not can_prefill)
        self._embeds_next = not embeds
        padded_length = self.model.config.padded_length
        if embeds:
            members, tokens = _take_within(self.waiting_embeds, self.prefill_batch_tokens, pooling=True)
            self.taken = members  # out of the queue, not yet work: should setting up fail, fail_all finds them
            documents = [list(d) for job in members for d in job.request.documents]
            contexts = [c for job in members for c in job.request.contexts or [0] * len(job.request.documents)]
            steps = self.embed_steps(documents, pooling=members[0].request.pooling,
                                     max_batch_tokens=self.prefill_batch_tokens, contexts=contexts)
            lengths = [len(d) for d in documents]
        else:
            def room(jobs):
                return self.decoder.room_for([(job.slots, job.reserve) for job in jobs])

            members, tokens = _take_within(self.waiting, self.prefill_batch_tokens, room=room)
            self.taken = members
            for job in members:  # every choice's slot and cache blocks now; the prompt is computed in the first only
                for choice in job.choices:
                    choice.slot = self.decoder.allocate(job.reserve)
            steps = self.decoder.prefill_steps([(job.choices[0].slot, list(job.request.prompt_ids))
                                                for job in members],
                                               prompt_logits=any(job.request.prompt_logprobs for job in members))
            lengths = [job.tokens for job in members]
            self.prefills += 1
        layers = self.model.config.num_layers * len(length_groups(lengths, padded_length, self.prefill_batch_tokens))
        self.taken = []
        for job in members:
            if job.started is None and self.metrics:  # once: a member of a failed batch is retried alone
                self.metrics.queue_time(now - job.arrival)
            job.started = job.started or now
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
        if self.metrics:
            self.metrics.prefill(work.tokens, time.monotonic() - work.started)
        if work.kind == "embed":
            self._finish_embeddings(work, result, events)
        else:
            self._start_decoding(work, result, events)
        self.work = None  # only now: should the hand-over fail, `fail_all` still finds every member

    def _forward_failed(self, work: Work, error: Exception, events: Events) -> None:
        """A batch that fails is split: each member is retried alone, so only the one that breaks it fails."""
        self.work = None
        live = [job for job in work.members if not job.cancelled]
        for job in work.members:
            self._release(job)
        if len(live) > 1:
            log.warning("%s of %d requests failed (%s); retrying each alone", work.kind, len(live), error)
            pending = self.waiting_embeds if work.kind == "embed" else self.waiting
            for job in reversed(live):
                job.alone = True
                pending.appendleft(job)
            return
        log.error("%s failed", work.kind, exc_info=error)
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
        for row, job in enumerate(work.members):
            if job.cancelled:
                self._release(job)
                continue
            try:
                self._start_job(job, row, result, events)
            except Exception as error:  # noqa: BLE001 - one request's start (e.g. its prompt logprobs), not the batch's
                log.exception("starting generation failed for %s", job.uid)
                self._release(job)
                events.append((job.route, Failed(job.uid, 500, f"starting generation failed: {error}",
                                                 ErrorCode.INTERNAL)))

    def _start_job(self, job: GenerateJob, row: int, result, events: Events) -> None:
        """Put a prefilled request's choices into their decode slots and sample each one's first token."""
        if job.request.prompt_logprobs:
            events.append((job.route, _prompt_logprobs(job, result.prompt_logits[row])))
        if job.request.params.max_tokens == 0:
            self._release(job)
            events.append((job.route, Finished(job.uid, FinishReason.LENGTH, job.tokens, 0)))
            return
        first = job.choices[0]
        for choice in job.choices:
            if choice is not first:
                self.decoder.copy_slot(first.slot, choice.slot)
            self.adjuster.start(choice.slot, job.request.prompt_ids, choice.sampler.params,
                                self.model.config.eos_token_id)
            self.running[choice.slot] = choice
        logits = result.last_logits[row: row + 1]
        adjusted = self.adjuster.apply(logits, [first.slot])  # the same for every choice: one prompt
        for choice in job.choices:
            if not self._accept(choice, logits[0], None if adjusted is None else adjusted[0], events):
                break
        self._count_tokens(job.choices)

    # ---- decoding -------------------------------------------------------------------------------------
    def _decode_step(self, events: Events) -> None:
        slots = list(self.running)
        choices = [self.running[slot] for slot in slots]
        try:
            logits = self.decoder.step(slots, [choice.generated[-1] for choice in choices])
            adjusted = self.adjuster.apply(logits, slots)
            rows = logits.detach().float().cpu()  # one device-to-host copy for the batch
            adjusted_rows = adjusted.cpu() if adjusted is not None else [None] * len(slots)
        except Exception as error:  # noqa: BLE001 - no row is to blame: fail the batch, keep serving
            log.exception("decode step failed")
            for job in {id(c.job): c.job for c in choices}.values():
                self._release(job)
                events.append((job.route, Failed(job.uid, 500, f"decode step failed: {error}", ErrorCode.INTERNAL)))
            return
        if self.metrics:
            self.metrics.decode_batch(len(slots))
        for choice, row, adjusted_row in zip(choices, rows, adjusted_rows):
            if choice.slot is not None:  # not ended by a sibling's failure in this loop
                self._accept(choice, row, adjusted_row, events)
        self._count_tokens(choices)

    def _count_tokens(self, choices: list[Choice]) -> None:
        """The penalties' token counts, one scatter for the batch; choices that ended hold no slot."""
        going_on = [choice for choice in choices if choice.slot is not None]
        self.adjuster.record([c.slot for c in going_on], [c.generated[-1] for c in going_on])

    def _accept(self, choice: Choice, logits: torch.Tensor, adjusted: torch.Tensor | None, events: Events) -> bool:
        """Sample the next token of one choice and apply its stopping rules; a failure here fails its request
        alone. Returns whether the request goes on."""
        job = choice.job
        try:
            picked = choice.sampler.choose(logits.detach().float().cpu(),
                                           None if adjusted is None else adjusted.float().cpu())
            token = self._token(choice, picked)
        except Exception as error:  # noqa: BLE001 - this request's sampling or stop rule, not the batch's
            log.exception("sampling failed for %s", job.uid)
            self._release(job)
            events.append((job.route, Failed(job.uid, 500, f"sampling failed: {error}", ErrorCode.INTERNAL)))
            return False
        events.append((job.route, token))
        if token.finish is not None:
            self._release_choice(choice)
            choice.done = True
            if all(c.done for c in job.choices):
                events.append((job.route, Finished(job.uid, token.finish, job.tokens, _completion_tokens(job))))
        return True

    def _token(self, choice: Choice, picked: TokenChoice) -> Token:
        choice.generated.append(picked.token)
        params = choice.sampler.params
        reason = finish_reason(params, self.model.config.eos_token_id, picked.token, len(choice.generated))
        text = ""
        if choice.text is None:
            pass
        elif reason is FinishReason.STOP:  # a stop token's own text is not completion, but what was held back is
            text = choice.text.finish()
        else:
            text, stopped = choice.text.push(picked.token)
            if stopped:
                reason = FinishReason.STOP
            elif reason is not None:
                text += choice.text.finish()
        return Token(choice.job.uid, picked.token, text, picked.logprob, picked.top_logprobs, choice.index, reason)


def _take_within(pending: deque, budget: int, *, room=None, pooling: bool = False):
    """Pop jobs from the front while their sizes fit the token budget (the first always goes) and, for
    generation, `room(jobs)` says the decoder has slots and cache blocks for all of them; for embeddings
    only jobs that pool the same way; a job marked `alone` goes alone."""
    members, total = [], 0
    while pending and (room is None or room([*members, pending[0]])):
        job = pending[0]
        if members and (job.alone or members[0].alone or total + job.tokens > budget
                        or (pooling and job.request.pooling != members[0].request.pooling)):
            break
        members.append(pending.popleft())
        total += job.tokens
    return members, total


def _completion_tokens(job: Job) -> int:
    return sum(len(choice.generated) for choice in job.choices)


def _prompt_logprobs(job: GenerateJob, logits: torch.Tensor) -> PromptLogprobs:
    """Log-probability of each prompt token given the ones before it (the first has none)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(job.request.prompt_ids, device=logprobs.device)
    chosen = [None] + logprobs[:-1].gather(1, ids[1:, None])[:, 0].tolist()
    count = job.request.params.logprobs
    top: list = [None] * len(ids)
    if count is not None:  # as for generated tokens: the likeliest `count`, and the prompt's own token always
        values, indices = torch.topk(logprobs[:-1], min(count, logprobs.shape[-1]))
        top = [None] + [with_chosen(i, v, token, lp) for i, v, token, lp in
                        zip(indices.tolist(), values.tolist(), ids[1:].tolist(), chosen[1:])]
    return PromptLogprobs(job.uid, chosen, top)
