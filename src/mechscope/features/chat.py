"""Chat backends for auto-interpretation: any local ``transformers`` chat model, or an OpenAI-compatible
server that the user configures (the only network access in mechscope's feature code).

A backend implements :class:`ChatBackend` (``complete``) and optionally ``logprobs``, which detection
scoring then uses instead of the text reply.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from mechscope.core.errors import BackendError, InputError

Messages = list[dict]


@runtime_checkable
class ChatBackend(Protocol):
    """A chat model. ``complete`` returns the assistant's reply to ``messages`` (OpenAI-style dicts with
    ``role`` and ``content``); greedy and deterministic at ``temperature=0``.

    A backend may also define ``logprobs(conversations, candidates) -> list[list[float]]``: for each
    conversation, the log-probability (nats) of each candidate as the first token of the reply.
    :func:`score_detection` then uses it instead of the text reply.
    """

    name: str

    def complete(self, messages: Messages, *, max_new_tokens: int = 32, temperature: float | int = 0.0,
                 seed: int = 0) -> str: ...


class LocalChatBackend:
    """Any local ``transformers`` chat model, prompted through its chat template.

    Args:
        model_or_path: a :class:`~mechscope.HookedModel`, or a name/folder/hub id for :func:`mechscope.load`.
        batch_size: contexts per forward pass in :meth:`logprobs`.

    Raises:
        InputError: the tokenizer is missing or has no chat template.
    """

    def __init__(self, model_or_path: Any, *, batch_size: int = 16):
        if isinstance(model_or_path, (str, os.PathLike)):
            from mechscope.models.loading import load

            model_or_path = load(str(model_or_path))
        self.model = model_or_path
        self.tokenizer = getattr(model_or_path, "tokenizer", None)
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InputError("LocalChatBackend needs a chat model whose tokenizer has a chat template; load an "
                             "instruct/chat model (e.g. mechscope.load('smollm2-135m')).")
        self.batch_size = batch_size
        self.name = f"local:{model_or_path.cfg.name}"

    def _ids(self, messages: Messages) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def complete(self, messages: Messages, *, max_new_tokens: int = 32, temperature: float | int = 0.0,
                 seed: int = 0) -> str:
        from transformers import GenerationConfig

        hf = self.model.hf
        ids = torch.tensor([self._ids(messages)], device=self.model.device)
        eos = hf.generation_config.eos_token_id or self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, eos_token_id=eos,
                               pad_token_id=pad, **({"temperature": temperature, "top_p": 1.0, "top_k": 0}
                                                    if temperature > 0 else {}))
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def logprobs(self, conversations: Sequence[Messages], candidates: Sequence[str]) -> list[list[float]]:
        """Log-probabilities (nats) of each single-token candidate as the reply's first token.

        Conversations are sorted by length and run in left-padded batches of ``batch_size``.

        Raises:
            InputError: a candidate that is not exactly one token for this tokenizer.
        """
        cand_ids = []
        for c in candidates:
            ids = self.tokenizer.encode(c, add_special_tokens=False)
            if len(ids) != 1:
                raise InputError(f"candidate {c!r} is {len(ids)} tokens for this tokenizer; pick single-token "
                                 f"answers (e.g. 'Yes'/'No' or '1'/'0').")
            cand_ids.append(ids[0])
        seqs = [self._ids(m) for m in conversations]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: list[list[float]] = [[] for _ in seqs]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = max(len(seqs[i]) for i in rows)
            ids = torch.tensor([[pad] * (width - len(seqs[i])) + seqs[i] for i in rows], device=self.model.device)
            mask = torch.tensor([[0] * (width - len(seqs[i])) + [1] * len(seqs[i]) for i in rows],
                                device=self.model.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
            lp = logits[:, -1].float().log_softmax(-1)[:, cand_ids].tolist()
            for i, row in zip(rows, lp):
                out[i] = row
        return out


class OpenAIChatBackend:
    """An OpenAI-compatible chat server (OpenAI, vLLM, llama.cpp, Ollama, ...), over HTTP with urllib.

    Only this class opens network connections, and only to ``base_url``, which the user chooses.

    Args:
        base_url: the API root including ``/v1``, e.g. ``"http://127.0.0.1:8000/v1"``; requests go to
            ``{base_url}/chat/completions``.
        model: the server's model name.
        api_key_env: environment variable holding the API key (sent as a Bearer token if set; local
            servers usually need none).
        timeout_s: seconds before a request is abandoned.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout_s: float | int = 60.0):
        if not base_url.startswith(("http://", "https://")):
            raise InputError(f"base_url {base_url!r} must start with http:// or https://, e.g. http://127.0.0.1:8000/v1.")
        if timeout_s <= 0:
            raise InputError(f"timeout_s must be > 0 seconds; got {timeout_s}.")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.timeout_s = model, api_key_env, timeout_s
        self.name = f"openai:{model}@{base_url}"

    def complete(self, messages: Messages, *, max_new_tokens: int = 32, temperature: float | int = 0.0,
                 seed: int = 0) -> str:
        """The reply's text.

        Raises:
            BackendError: connection refused or timed out, an HTTP error status, or a body that is not
                an OpenAI chat completion (each message names the URL and the fix).
        """
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_new_tokens,
                           "temperature": temperature, "seed": seed}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            hint = f"set {self.api_key_env}" if e.code in (401, 403) else "check the model name and the server's log"
            raise BackendError(f"{self.url} answered HTTP {e.code} {e.reason}: {detail!r}; {hint}.") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise BackendError(f"cannot reach {self.url}: {reason} (timeout {self.timeout_s} s); start the server "
                               f"or fix base_url.") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise BackendError(f"{self.url} did not return an OpenAI chat completion (choices[0].message.content); "
                               f"got {raw[:200]!r}; point base_url at an OpenAI-compatible /v1 root.") from None
