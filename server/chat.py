"""POST /v1/chat/completions: messages rendered into a prompt by the model's chat template, then served like
a completion (`completions.serve`) in the chat shapes.

The template is Jinja2 over `messages` and `add_generation_prompt`, the convention of Hugging Face
tokenizers: `--chat-template FILE`, else the checkpoint's `chat_template.jinja` or the `chat_template` of
its `tokenizer_config.json`. A model without one answers 400, as vLLM does for base models.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import protocol
from .completions import GenerationRoute, engine_requests
from .generation import ChatShape, Generation, Prompt
from .protocol import APIError, ChatCompletionRequest

log = logging.getLogger(__name__)


def load_chat_template(settings) -> str | None:
    """The template's source, or None when the model has none."""
    if settings.chat_template:
        return Path(settings.chat_template).read_text()
    checkpoint = settings.model_path
    if (checkpoint / "chat_template.jinja").exists():
        return (checkpoint / "chat_template.jinja").read_text()
    config = checkpoint / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


class ChatRoute(GenerationRoute):
    schema = ChatCompletionRequest

    def __init__(self, spec):
        super().__init__(spec)
        self._template = None

    def template(self):
        """Compiled once per process; a sandbox, since a template is code from a checkpoint or a user."""
        if self._template is None:
            source = load_chat_template(self.spec.settings)
            if source is None:
                raise APIError(400, "This model has no chat template, so it cannot serve chat completions: use "
                                    "/v1/completions, or start the server with --chat-template FILE.",
                               param="messages", code="chat_template_missing")
            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            environment.globals["raise_exception"] = _refuse  # what Hugging Face templates call to refuse
            self._template = environment.from_string(source)
        return self._template

    def _generation(self, body: ChatCompletionRequest, timeout: float, arrival: float):
        spec = self.spec
        for tools, choice in (("tools", "tool_choice"), ("functions", "function_call")):
            if getattr(body, tools) and getattr(body, choice) != "none":
                raise protocol.unsupported(tools, "this model does not call tools")
            if not getattr(body, tools) and getattr(body, choice) not in (None, "none", "auto"):  # auto: text
                raise APIError(400, f"'{choice}' asks for a tool call, but '{tools}' names no tool.",
                               param=choice, code="invalid_value")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise protocol.unsupported("response_format", "only text is produced")
        if body.audio is not None or set(body.modalities or ()) - {"text"}:
            raise protocol.unsupported("audio" if body.audio is not None else "modalities", "only text is produced")
        if body.web_search_options is not None:
            raise protocol.unsupported("web_search_options", "this server does not search the web")
        text = self.render(body)
        ids = spec.encode_prompt(text, "messages", truncating=body.truncate_prompt_tokens is not None)
        if body.truncate_prompt_tokens is not None:
            ids = ids[-body.truncate_prompt_tokens:]
        if not ids:
            raise APIError(400, "The messages render to an empty prompt.", param="messages", code="empty_prompt")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs",
                           code="invalid_value")
        generation = Generation(
            spec, f"chatcmpl-{uuid.uuid4().hex}", [Prompt(ids, text)], n=body.n, keep=body.n,
            shape=ChatShape(top_logprobs=logprobs or 0),
            echo=False, logprobs=body.logprobs, stream_options=body.stream_options,
            return_token_ids=body.return_token_ids, arrival=arrival)
        messages = engine_requests(spec, body, generation, logprobs=logprobs, prompt_logprobs=False, timeout=timeout)
        return generation, messages

    def render(self, body: ChatCompletionRequest) -> str:
        """The prompt text of a chat's messages (checked first: roles, content of text only)."""
        for index, message in enumerate(body.messages):
            message.check(index)
        messages = [{**message.model_dump(exclude_none=True), "content": message.text()}
                    for message in body.messages]
        variables = {"bos_token": "", "eos_token": "", **(body.chat_template_kwargs or {}), "messages": messages,
                     "add_generation_prompt": body.add_generation_prompt}
        template = self.template()
        try:
            # Passed as one mapping: a chat_template_kwargs key named "self" would collide with render's own
            return template.render(variables)
        except Exception as error:  # noqa: BLE001 - the template is fixed: what fails is these messages or kwargs
            reason = str(error) if isinstance(error, TemplateError) else f"{type(error).__name__}: {error}"
            raise APIError(400, f"The chat template could not render these messages: {reason}", param="messages",
                           code="invalid_value") from None


def _refuse(message: str):
    raise TemplateError(message)
