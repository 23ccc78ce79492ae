"""The one chat-template renderer both backends use (specli/chat_template.py)."""

from __future__ import annotations

import pytest

from specli.chat_template import render_chat
from specli.errors import SpecliError

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def render(template: str, messages=None) -> str:
    return render_chat(template, messages or [{"role": "user", "content": "Hi"}],
                       bos_token="<s>", eos_token="</s>", source="model.gguf")


def test_renders_messages_and_opens_the_assistant_turn():
    assert render(CHATML) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render("{{ bos_token }}{{ messages | tojson }}{{ eos_token }}",
                  [{"role": "user", "content": "Résumé"}]) == \
        '<s>[{"role": "user", "content": "Résumé"}]</s>'  # tojson keeps non-ASCII text
    assert render("{% generation %}x{% endgeneration %}"
                  "{% for m in messages %}{% break %}{% endfor %}") == "x"


def test_a_template_is_sandboxed_and_its_errors_are_one_line():
    with pytest.raises(SpecliError, match="chat template of model.gguf failed: .*unsafe"):
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SpecliError, match="failed: only user turns"):
        render("{{ raise_exception('only user turns') }}")
    with pytest.raises(SpecliError, match="chat template of model.gguf failed"):
        render("{% for %}")


def test_gguf_templates_render_as_llama_cpp_python_renders_them(tiny_models):
    """Same text as llama-cpp-python's own formatter, which the GGUF backend used before."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    m = tiny_models["target"]
    template = m.chat_template()
    assert template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Ça va ?"}]
    ref = Jinja2ChatFormatter(
        template, add_generation_prompt=True,
        eos_token=m._token_text(llama_cpp.llama_vocab_eos(m._vocab)),
        bos_token=m._token_text(llama_cpp.llama_vocab_bos(m._vocab)))(messages=messages).prompt
    assert m.chat_prompt(messages) == ref
