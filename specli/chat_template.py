"""One renderer for the chat templates models ship (GGUF metadata, tokenizer_config.json).

Templates come with downloaded files, so they render in Jinja's immutable sandbox; the
environment follows Hugging Face transformers' (trim_blocks, lstrip_blocks, loop controls,
`{% generation %}` ignored, `tojson` without ASCII escapes, `raise_exception`,
`strftime_now`), which is what the templates are written against.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import SpecliError


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` marks: rendered as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
        extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str, messages: list[dict[str, str]], *, bos_token: str,
                eos_token: str, source: str) -> str:
    """The prompt text for `messages`, ending with the assistant's turn opened.
    `source`: the model's name, for the one-line error a broken template gives."""
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=True,
                                          bos_token=bos_token, eos_token=eos_token)
    except Exception as e:  # a template's own complaint (raise_exception), or a bug in it
        raise SpecliError(f"chat template of {source} failed: {e}") from None
