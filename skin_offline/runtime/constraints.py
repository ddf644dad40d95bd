"""Constrained answers: what the answer must match (typed), compiled and checked once, masked per row per step.

    JsonSchema({...}) | JsonObject() | Regex(r"...") | Choice(["urgent", "routine"]) | Grammar(lark_text)

llguidance (the Rust library behind onnxruntime-genai's and llama.cpp's constraints) does the work: it compiles a
constraint against the bundle's own tokenizer.json and, per step, gives the set of tokens that keep the answer
inside the language (a bitmask over the vocabulary). A constraint describes the answer's *text*: LLaVA's template
puts one space before every answer ("[/INST] {answer}"), which the detokenizer drops, so the compiled grammar is
`" "? answer` -- the model may start with its natural word-start token and the text still matches exactly.

Masks are computed off the decode critical path: the engine asks for a row's next mask (`Matcher.prefetch`) as soon
as its token is known, and a worker thread computes it while the decoder runs (llguidance releases the GIL).
EOS is allowed exactly when the answer is complete; an answer the grammar cannot extend ends with STOP at once.
Nothing about a constraint is ever logged but its kind (a schema can carry patient-identifying enum values).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from ..errors import ConstraintError

MAX_CONSTRAINT_BYTES = 64 << 10  # a schema / grammar / choice list bigger than this is refused before compiling
_JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # compact, one form
INSTALL_HINT = "pip install 'skin-offline[structured]'"


@dataclass(frozen=True)
class JsonSchema:
    """A JSON value valid under `schema` (the keywords llguidance implements; others are refused by name)."""

    schema: Mapping[str, Any]
    name: str = "answer"


@dataclass(frozen=True)
class JsonObject:
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""


@dataclass(frozen=True)
class Regex:
    """Text that fully matches `pattern` (Rust regex syntax, as llguidance reads it)."""

    pattern: str


@dataclass(frozen=True)
class Choice:
    """Exactly one of `options`."""

    options: tuple[str, ...]

    def __init__(self, options: Sequence[str]):
        object.__setattr__(self, "options", tuple(options))


@dataclass(frozen=True)
class Grammar:
    """Text in the language of a Lark grammar (llguidance's Lark dialect; `start` is the top rule)."""

    lark: str


Constraint = Union[JsonSchema, JsonObject, Regex, Choice, Grammar]

KINDS = {JsonSchema: "json_schema", JsonObject: "json_object", Regex: "regex", Choice: "choice", Grammar: "grammar"}


def kind(c: Constraint) -> str:
    """The one thing about a constraint that may be logged."""
    return KINDS[type(c)]


def structured_value(matcher: "Matcher | None", text: str, finish: Any) -> Any:
    """What a complete constrained answer means to software: the parsed JSON of a JSON answer, the text of a regex /
    choice / grammar answer; None for free text or an answer cut short (`finish` is not STOP: never claimed valid)."""
    if matcher is None or str(finish) != "stop":
        return None
    return json.loads(text) if matcher.kind in ("json_schema", "json_object") else text


def _answer_grammar(c: Constraint, field_name: str) -> dict[str, Any]:
    """The constraint as one llguidance grammar entry named "answer"."""
    import llguidance

    if isinstance(c, (JsonSchema, JsonObject)):
        schema = dict(c.schema) if isinstance(c, JsonSchema) else {"type": "object"}
        try:
            g = json.loads(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS))
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"{field_name}: not a JSON schema object ({e}); pass a JSON Schema") from None
        return {**g["grammars"][0], "name": "answer"}
    if isinstance(c, Regex):
        return {**json.loads(llguidance.LLMatcher.grammar_from_regex(c.pattern))["grammars"][0], "name": "answer"}
    if isinstance(c, Choice):
        lark = "start: " + " | ".join(json.dumps(o) for o in c.options)  # Lark string literals take JSON escapes
        return {"name": "answer", "lark_grammar": lark}
    return {"name": "answer", "lark_grammar": c.lark}


def _check_shape(c: Constraint, field_name: str) -> None:
    if isinstance(c, Choice):
        if len(c.options) < 1 or any(not isinstance(o, str) or not o for o in c.options):
            raise ConstraintError(f"{field_name}: a choice needs one or more non-empty strings")
        if len(set(c.options)) != len(c.options):
            raise ConstraintError(f"{field_name}: the choices repeat; pass each once")
        size = sum(len(o.encode()) for o in c.options)
    elif isinstance(c, JsonSchema):
        if not isinstance(c.schema, Mapping):
            raise ConstraintError(f"{field_name}: a JSON schema must be a JSON object")
        size = len(json.dumps(c.schema))
    elif isinstance(c, Regex):
        if not isinstance(c.pattern, str) or not c.pattern:
            raise ConstraintError(f"{field_name}: the regular expression is empty")
        size = len(c.pattern.encode())
    elif isinstance(c, Grammar):
        if not isinstance(c.lark, str) or not c.lark.strip():
            raise ConstraintError(f"{field_name}: the grammar is empty")
        size = len(c.lark.encode())
    else:
        size = 0
    if size > MAX_CONSTRAINT_BYTES:
        raise ConstraintError(
            f"{field_name}: {size} bytes, over the limit of {MAX_CONSTRAINT_BYTES}; simplify the constraint"
        )


def _one_line(msg: str) -> str:
    """llguidance's messages may span lines (the grammar text with a caret under it): its first line, without the
    position prefix, and the detail line ("error: ...") when there is one."""
    lines = [x.strip() for x in msg.splitlines() if x.strip()]
    if not lines:
        return "invalid"
    head = re.sub(r"^at \d+\(\d+\):\s*", "", lines[0]).rstrip(":")
    detail = next((x.removeprefix("error:").strip() for x in lines[1:] if x.startswith("error:")), "")
    return f"{head} ({detail})" if detail else head


class Vocabulary:
    """The bundle's tokenizer as llguidance sees it (built once per model, on first use: ~0.1-2 s)."""

    CACHE_SIZE = 16  # compiled constraints kept (a clinic tool sends the same form schema every time)

    def __init__(self, tokenizer_json: Path, eos_id: int):
        self.path, self.eos_id = Path(tokenizer_json), eos_id
        self._tok: Any = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, Compiled] = OrderedDict()

    @property
    def ll(self) -> Any:
        with self._lock:
            if self._tok is None:
                try:
                    import llguidance
                except ImportError:
                    raise ConstraintError(f"constrained answers need llguidance: {INSTALL_HINT}") from None
                self._tok = llguidance.LLTokenizer(str(self.path), eos_token=self.eos_id)
            return self._tok

    def compile(self, c: Constraint, field_name: str = "constraint") -> "Compiled":
        """Check a constraint and compile it against this vocabulary, or raise ConstraintError naming the field."""
        if not isinstance(c, tuple(KINDS)):
            raise ConstraintError(
                f"{field_name}: not a constraint ({type(c).__name__}); use JsonSchema, JsonObject, "
                f"Regex, Choice or Grammar"
            )
        _check_shape(c, field_name)
        tok = self.ll
        import llguidance

        grammar = json.dumps(
            {"grammars": [{"name": "main", "lark_grammar": 'start: " "? @answer'}, _answer_grammar(c, field_name)]}
        )
        with self._lock:
            hit = self._compiled.get(grammar)
            if hit is not None:
                self._compiled.move_to_end(grammar)
                return hit
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
        if is_error:
            raise ConstraintError(f"{field_name}: {_one_line(messages[0])}; fix the {kind(c).replace('_', ' ')}")
        compiled = Compiled(c, grammar, self)
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > self.CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled


@dataclass(frozen=True)
class Compiled:
    """A checked constraint, ready to give each row that decodes under it its own matcher."""

    constraint: Constraint
    grammar: str = field(repr=False)
    vocab: Vocabulary = field(repr=False)

    @property
    def kind(self) -> str:
        return kind(self.constraint)

    def matcher(self) -> "Matcher":
        import llguidance

        tok = self.vocab.ll
        m = llguidance.LLMatcher(tok, self.grammar, log_level=0)  # 0: llguidance prints nothing
        if m.is_error():
            raise ConstraintError(f"constraint ({self.kind}): {_one_line(m.get_error())}")
        return Matcher(m, tok.vocab_size, self.kind)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="skin-offline-mask")
        return _POOL


class Matcher:
    """One row's place in the language: the next allowed tokens, then the chosen one consumed."""

    def __init__(self, m: Any, vocab_size: int, kind: str):
        self._m = m
        self.vocab_size, self.kind = vocab_size, kind
        self._words = np.full((1, (vocab_size + 31) // 32), -1, np.int32)  # [1, ceil(V/32)] bitmask
        self._pending: Future[None] | None = None

    def _fill(self) -> None:
        v = self._words[0]
        self._m.unsafe_compute_mask_ptr(v.ctypes.data, v.nbytes)  # drops the GIL

    def prefetch(self) -> None:
        """Start computing the next mask in a worker thread (while the decoder runs)."""
        if self._pending is None:
            self._pending = _pool().submit(self._fill)

    def allowed(self) -> np.ndarray:
        """[V] bool: the tokens that keep the answer in the language (EOS only once it is complete)."""
        if self._pending is None:
            self._fill()
        else:
            self._pending.result()
            self._pending = None
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self.vocab_size]
        return bits.astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """[V'] logits -> a copy with every disallowed token at -inf (ids past the tokenizer's vocabulary too)."""
        allowed = self.allowed()
        out = np.full_like(logits, -np.inf)
        n = min(len(logits), len(allowed))
        out[:n] = np.where(allowed[:n], logits[:n], -np.inf)
        return out

    def consume(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise ConstraintError(
                f"constraint: token {token} was chosen outside the allowed set ({_one_line(self._m.get_error())})"
            )

    @property
    def complete(self) -> bool:
        """The answer matches and the grammar allows nothing more (only EOS)."""
        return bool(self._m.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self._m.is_accepting())

    def copy(self) -> "Matcher":
        """An independent matcher at the same place (a beam that forks)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        return Matcher(self._m.deep_copy(), self.vocab_size, self.kind)
