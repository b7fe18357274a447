"""
chat_template.py: a chat model's own template, rendered as transformers renders it, and the token ids of a chat.

An instruction-tuned model was trained on conversations laid out by its chat template, a Jinja2 program
that ships with the model (GGUF's tokenizer.chat_template; Hugging Face's tokenizer_config.json or
chat_template.jinja). SmolLM2's writes each message as "<|im_start|>{role}\\n{content}<|im_end|>\\n"
(ChatML) and, asked for a generation prompt, ends with "<|im_start|>assistant\\n". The template is not
re-implemented here: it is rendered. It comes from a file, so it is untrusted code: it runs in Jinja2's
ImmutableSandboxedEnvironment, set up as transformers' apply_chat_template sets it up (trim_blocks,
lstrip_blocks, loopcontrols; a tojson filter that does not escape HTML; raise_exception, strftime_now;
the special tokens bos_token, eos_token... as variables), so the text is the one transformers renders.

    info = chat_info(template, tok, bos_id=1, eos_id=2)          # what a checkpoint keeps (meta["chat"])
    text = render(info, [{"role": "user", "content": "Hi"}])     # ... "<|im_start|>assistant\\n"
    ids = prompt_ids(info, tok, messages)                         # its ids, special tokens as their ids
    info["stop_ids"]                                              # generation ends at the end of the turn

The end-of-turn token is found by rendering a probe conversation: the special token the template writes
right after an assistant message (<|im_end|> for ChatML, <|eot_id|> for Llama 3, </s> for Mistral).
"""

import ctypes
import functools
import json
import math
import threading
from datetime import datetime

from errors import FileFormatError, UserError

PROBE = "PROBE_0f1e2d3c"                # an assistant message no template changes, to find what follows it

# What one render may cost. A template is a program: the sandbox keeps it from reaching Python's internals,
# and these keep it from hanging or exhausting memory (a loop of 10^10 steps, 'a' * 10**10, 7 ** 10**8).
RENDER_SECONDS = 10.0                   # wall-clock time of one render (SmolLM2's template: ~0.1 ms)
RENDER_MEMORY = 1 << 28                 # bytes of new address space a render may take (Linux: RLIMIT_AS)
RENDER_CHARS = 1 << 20                  # characters of output beyond 4x the conversation's own text
POWER_BITS = 1 << 16                    # the largest integer `**` may build, in bits


class _Timeout(BaseException):
    """Raised inside a render that ran out of time (a BaseException: the template cannot catch it)."""


def _jinja():
    """jinja2, at a version without the known sandbox escapes (3.1.6, as transformers requires)."""
    try:
        import jinja2
    except ImportError:
        raise UserError("chat needs jinja2: pip install 'jinja2>=3.1.6'") from None
    if tuple(int(x) for x in jinja2.__version__.split(".")[:3] if x.isdigit()) < (3, 1, 6):
        raise UserError(f"chat needs jinja2 >= 3.1.6 (older ones have sandbox escapes); this is {jinja2.__version__}")
    return jinja2


def compile_template(template):
    """The template compiled in the sandbox, with transformers' options and helpers; FileFormatError if
    it is not text or does not parse."""
    if not isinstance(template, str):
        raise FileFormatError(f"the chat template is {type(template).__name__} {str(template)[:40]!r}, expected text")
    return _compile(template)


@functools.lru_cache(maxsize=8)
def _compile(template):
    jinja2 = _jinja()
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: transformers marks the assistant's text with it (for
        training masks); rendering it is rendering its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Bounded(ImmutableSandboxedEnvironment):
        """The sandbox, except that `**` cannot build a number of more than POWER_BITS bits: a huge power
        is one long computation in C, which no time limit can interrupt."""
        intercepted_binops = frozenset(["**"])

        def call_binop(self, context, operator, left, right):
            if (operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1
                    and right * math.log2(abs(left)) > POWER_BITS):
                raise jinja2.exceptions.SecurityError(f"{left} ** {right} is too large a number")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except Exception as e:          # a syntax error, or nesting too deep for the parser (RecursionError)
        raise FileFormatError(f"the chat template does not parse: {type(e).__name__}: {e}") from None


def render_template(template, messages, add_generation_prompt=True, **context):
    """The template's text for messages [{"role": ..., "content": ...}]; `context` holds the special tokens
    (bos_token="<s>", ...). Whatever goes wrong inside (raise_exception, a sandbox violation, 1 / 0, an
    endless loop, a string too large) is UserError "the chat template failed: ...". The render is
    bounded: at most RENDER_SECONDS, RENDER_MEMORY bytes and 4x the conversation's text + RENDER_CHARS
    characters of output (render_bounded)."""
    compiled = compile_template(template)
    own = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
    variables = dict(messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                     **context)
    try:
        return render_bounded(compiled, variables, 4 * own + RENDER_CHARS)
    except UserError:
        raise
    except Exception as e:          # TemplateError, SecurityError, ZeroDivisionError, TypeError, RecursionError...
        what = str(e) if isinstance(e, _jinja().exceptions.TemplateError) else f"{type(e).__name__}: {e}"
        raise UserError(f"the chat template failed: {what}") from None


def render_bounded(compiled, variables, max_chars):
    """compiled.render(**variables), within limits: the output streams piece by piece and stops past
    max_chars; a watchdog thread raises _Timeout inside the render after RENDER_SECONDS (an asynchronous
    exception, delivered between two Python bytecodes: the template's loops are Python code); and on Linux
    the address space may grow by RENDER_MEMORY at most (RLIMIT_AS), so that a string too large to build
    is a MemoryError instead of a machine out of memory."""
    me = threading.get_ident()
    fired = threading.Event()

    def interrupt():
        fired.set()
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(me), ctypes.py_object(_Timeout))

    watchdog = threading.Timer(RENDER_SECONDS, interrupt)
    watchdog.start()                            # (before the memory limit: a new thread needs a stack)
    old_limit = _limit_address_space(RENDER_MEMORY)
    timed_out = out_of_memory = False
    pieces, n = [], 0
    try:
        for piece in compiled.generate(**variables):
            n += len(piece)
            if n > max_chars:
                break
            pieces.append(piece)
    except _Timeout:
        timed_out = True
    except MemoryError:
        out_of_memory = True
    finally:
        # subtle: the timeout may arrive in any line until the watchdog is stopped, this block's too; once
        # join() returns, it has been delivered or is pending, and a pending one is withdrawn (None)
        try:
            watchdog.cancel()
            watchdog.join()
            if fired.is_set():
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(me), None)
        except _Timeout:
            timed_out = True
        finally:
            _restore_address_space(old_limit)
    if timed_out:
        raise UserError(f"the chat template failed: it ran for more than {RENDER_SECONDS:g} s "
                        f"(a template that never ends?)")
    if out_of_memory:
        raise UserError(f"the chat template failed: it needed more than {RENDER_MEMORY >> 20} MiB of memory")
    if n > max_chars:
        raise UserError(f"the chat template failed: its output passed {max_chars:,} characters")
    return "".join(pieces)


def _limit_address_space(extra):
    """Let the process's address space grow by at most `extra` bytes from now (Linux's RLIMIT_AS); returns
    the old limit for _restore_address_space, or None where this cannot be done (then nothing changed)."""
    try:
        import resource
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * resource.getpagesize()
        old = soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        new = size + extra
        if hard != resource.RLIM_INFINITY:
            new = min(new, hard)
        if soft != resource.RLIM_INFINITY and soft <= new:
            return None                         # a lower limit is already set
        resource.setrlimit(resource.RLIMIT_AS, (new, hard))
        return old
    except (ImportError, OSError, ValueError):
        return None


def _restore_address_space(old):
    if old is not None:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, old)


def _token_context(info):
    return {k: info[k] for k in ("bos_token", "eos_token") if info.get(k) is not None}


def render(info, messages, add_generation_prompt=True):
    """render_template with a chat_info's template and special tokens."""
    if not info or not info.get("template"):
        raise UserError("this model has no chat template (import a chat model with export.py --import-gguf "
                        "or --import-hf)")
    return render_template(info["template"], messages, add_generation_prompt, **_token_context(info))


def prompt_ids(info, tok, messages):
    """The ids of the rendered conversation, special tokens written by the template as their ids (as
    apply_chat_template(tokenize=True) does; it adds no BOS: a template that wants one writes it)."""
    return tok.encode(render(info, messages), allowed_special="all")


def with_bos(info, ids):
    """The ids of a plain (non-chat) prompt as the model reads them: after its BOS when its metadata says
    plain prompts start with one (add_bos: Llama 3, and llama.cpp's rule for GGUF files), as llama.cpp and
    transformers' tokenizer(prompt) do; unchanged otherwise."""
    bos = (info or {}).get("bos_id")
    if (info or {}).get("add_bos") and bos is not None and ids[:1] != [bos]:
        return [bos] + ids
    return ids


def chat_info(template, tok, bos_id=None, eos_id=None, add_bos=False):
    """The chat metadata a checkpoint keeps: the template (None if the model has none), its special tokens,
    whether plain prompts start with BOS, and the ids that end a reply (the template's end-of-turn token
    and EOS).

    Example, SmolLM2: {"template": "{% for message in messages %}...", "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>", "add_bos": False, "stop_ids": [2]}.
    """
    name = {i: s for s, i in tok.special_tokens.items()}
    info = {"template": template or None, "bos_token": name.get(bos_id), "eos_token": name.get(eos_id),
            "bos_id": bos_id, "add_bos": bool(add_bos)}
    stop = {eos_id} if eos_id is not None else set()
    if template:
        compile_template(template)                      # a template that does not parse: refused now
        eot = end_of_turn(info, tok)
        if eot is not None:
            stop.add(tok.special_tokens[eot])
    info["stop_ids"] = sorted(stop)
    return info


def end_of_turn(info, tok):
    """The special token the template writes right after an assistant message, or None."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = render(info, probe, add_generation_prompt=False)
    except UserError:                                   # e.g. a template that insists on a system message
        return None
    rest = text[text.find(PROBE) + len(PROBE):] if PROBE in text else ""
    found = [s for s in tok.special_tokens if rest.startswith(s)]
    return max(found, key=len) if found else None


def from_meta(meta, tok):
    """A checkpoint's chat_info, or None when it has none (a model trained here). A fine-tuning run's
    metadata (train.py --sft: the template and its bos_token/eos_token strings) gets the ids chat_info
    derives from them: the stop ids, BOS."""
    info = meta.get("chat") if isinstance(meta, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("template"), str):
        return None
    if "stop_ids" not in info:
        sp = tok.special_tokens if getattr(tok, "special_tokens", None) else {}
        derived = chat_info(info["template"], tok, bos_id=sp.get(info.get("bos_token")), eos_id=sp.get(info.get("eos_token")))
        info = {**derived, **{k: v for k, v in info.items() if v}}
    return info
