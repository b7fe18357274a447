"""
sample.py: stream text from a checkpoint written by train.py, token by token, with the KV cache
(lib/generation.py).

    python sample.py                                            # the default job's checkpoint, prompt "\\n"
    python sample.py --ckpt out/stdlib-bpe2048 --prompt "def " --max-new-tokens 300
    python sample.py --ckpt out/tinyshakespeare-char/ckpt.safetensors --prompt "ROMEO:" \\
        --temperature 0.8 --top-k 200 --seed 1 --num-samples 3 --stop "\n\n"
    python sample.py --ckpt out/stdlib-bpe2048 --prompt-file start.py      # the prompt from a file
    python sample.py --backend cupy ...                         # generate on the GPU
    python sample.py --ckpt out/smollm2 --chat                  # chat with an imported chat model
    python sample.py --ckpt out/smollm2 --chat --system "Answer in French." --prompt "Hi!"   # one answer

Defaults per mode: plain text samples at temperature 0.8 among the top 200 tokens (nanoGPT's, good for
the small models trained here); --chat answers at temperature 0.2 with top-p 0.9 (SmolLM2's model card:
at 0.8 / top-k 200 its answers drift). Any flag given overrides its mode's default; --temperature 0 is
greedy. --stop TEXT (repeatable) ends a sample when the text it produced reaches TEXT, which is not
printed: the stream holds back, until it is known, any text that could be the start of a stop string. A
model that names its end-of-text token (imported models, fine-tuned chat models) ends a plain sample
there too, as transformers' generate() and llama.cpp do (--ignore-eos goes on past it).

The checkpoint carries its tokenizer, so nothing else is needed. Each token's bytes go through an
incremental UTF-8 decoder before printing, so a character split over two tokens (an emoji, "é" in a
byte-level BPE) prints whole once its last byte arrives.

--chat talks to a chat model (imported with export.py --import-gguf / --import-hf, or fine-tuned here with
train.py --sft): each turn renders the whole conversation with the model's own chat template
(lib/chat_template.py), feeds the model what is new since the last turn (the rest stays in the KV cache,
generation.KVSession), generates the reply token by token and stops at the template's end-of-turn token.
Interactive: type a message, Enter; Ctrl-D or Ctrl-C ends.
"""

import codecs
import math
import sys

from bpe import read_text
from errors import ArgumentParser, UserError, run_main
from lib import chat_template as chat, generation, inference, memory
from lib.checkpoint import CHECKPOINT_HELP, load_model
from lib.tokenizer import encode_prompt

# Sampling defaults per mode (--help states them; a flag given overrides them): (temperature, top_k, top_p)
DEFAULTS = {"text": (0.8, 200, 1.0),         # nanoGPT's: lively text from the small models trained here
            "chat": (0.2, 0, 0.9)}           # SmolLM2-Instruct's model card: steady answers


class StopText:
    """Writes generated text to `out` as it comes, except a tail that could still become one of the stop
    strings (held back until it cannot); add() returns True once the text reaches a stop string (at the end
    of a token, or inside one that brings its last characters), which is never written, nor anything after
    it. Example, stops ["\\n\\n"]: add("a\\n") writes "a"; add("\\nb") -> True, nothing more written."""

    def __init__(self, out, stops=()):
        self.out, self.stops = out, [s for s in stops if s]
        self.held, self.text = "", ""          # unwritten tail; everything produced (for the caller)

    def add(self, piece):
        self.held += piece
        # the held tail holds the whole start of any stop string the text may reach: search it only
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.write(self.held[:min(found)])
            self.held = ""
            return True
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.held)), 0, -1)
                    if self.held.endswith(s[:k])), default=0)
        self.write(self.held[:len(self.held) - keep])
        self.held = self.held[len(self.held) - keep:]
        return False

    def write(self, text):
        if text:
            self.out.write(text)
            self.out.flush()
            self.text += text

    def finish(self, end=""):
        """The end of the sample (no stop string came): write what was held back, then `end`."""
        self.write(self.held)
        self.held = ""
        self.out.write(end)
        self.out.flush()


def stream(params, cfg, tok, gm, prompt, max_new_tokens, temperature, top_k, top_p, seed, out=None, info=None,
           stops=(), stop_ids=()):
    """Write the prompt, then each new token's text as soon as it is complete UTF-8, until a stop string
    or a token of stop_ids (neither written). Returns the new ids (a stop id included). info: the
    checkpoint's chat metadata, whose add_bos puts BOS before the prompt (not written out)."""
    out = out or sys.stdout
    shown = encode_prompt(tok, prompt)                                  # the prompt, written out
    ids = chat.with_bos(info, shown)                                    # what the model reads
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out.write(dec.decode(tok.decode_bytes(shown)))
    out.flush()
    text, new = StopText(out, stops), []
    for i in generation.generate_stream(gm, params, ids, cfg, max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, stop_ids=stop_ids):
        new.append(i)
        if i in stop_ids:                                 # the model's end of text: the sample ends here
            break
        if text.add(dec.decode(tok.decode_bytes([i]))):  # "" while a character is still incomplete
            out.write("\n")
            out.flush()
            return new
    text.add(dec.decode(b"", final=True))
    text.finish("\n")
    return new


def check_memory(m, prompt_len, new_tokens):
    """Refuse (one line naming lib/memory.py's estimate) a generation whose weights, KV cache and prefill
    cannot fit."""
    need = memory.generation_bytes(m.cfg, prompt_len, new_tokens, memory.kv_cache_positions(m.cfg, prompt_len, new_tokens))
    memory.check_fits(need, f"sampling from {m.path} (context {m.cfg.max_seq_len:,})", m.gm,
                      hint="a shorter --prompt or fewer --max-new-tokens")


def reply(m, info, messages, args, out=None, session=None, seed=None):
    """Stream the model's answer to `messages` (rendered with its chat template) to `out`; returns its
    text, without the end-of-turn token that stopped it. session: the conversation's KVSession, so that
    a turn feeds the model only what is new since the last one."""
    out = out or sys.stdout
    ids = chat.prompt_ids(info, m.tokenizer, messages)
    stop = set(info["stop_ids"])
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, stopped = StopText(out, args.stop), False
    for i in generation.generate_stream(m.gm, m.params, ids, m.cfg, args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1.0 else None,
                                  seed=seed, stop_ids=stop, session=session):
        if i in stop:
            break
        if text.add(dec.decode(m.tokenizer.decode_bytes([i]))):
            stopped = True
            break
    if not stopped:
        text.add(dec.decode(b"", final=True))
    text.finish("\n")
    return text.text


def chat_session(m, args):
    """--chat: one answer to --prompt, or turns read from the terminal until end of input. The whole
    conversation is the model's prompt each turn (its history), but only what is new since the last turn
    goes through the model: the rest is in the KV cache kept between turns."""
    info = chat.from_meta(m.meta, m.tokenizer)
    if info is None:
        raise UserError(f"{m.path} has no chat template: --chat needs a chat model, imported with export.py "
                        f"--import-gguf or --import-hf (e.g. SmolLM2-135M-Instruct), or fine-tuned with train.py "
                        f"--sft (its runs save the template they trained on)")
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    session = generation.KVSession()
    while True:
        if args.prompt is not None:
            text = args.prompt
        else:
            try:
                text = input("> ")
            except (EOFError, RuntimeError, OSError):   # end of input; RuntimeError: stdin closed (<&-)
                print(file=sys.stderr)
                return
            if not sys.stdin.isatty():                  # piped in: show the message, as a terminal would
                print(text)
        messages.append({"role": "user", "content": text})
        if args.prompt is not None:                     # one message: --num-samples answers to it
            for k in range(args.num_samples):
                if k:
                    print(SEPARATOR)
                reply(m, info, messages, args, session=session, seed=sample_seed(args, k))
            return
        messages.append({"role": "assistant", "content": reply(m, info, messages, args, session=session,
                                                               seed=args.seed)})


SEPARATOR = "---------------"                  # between samples, as nanoGPT's sample.py prints them


def sample_seed(args, k):
    """The seed of sample k: --seed + k (each sample reproducible alone), or None (random)."""
    return None if args.seed is None else args.seed + k


def parse_args(argv):
    p = ArgumentParser(prog="sample.py", description="Stream text from a checkpoint (train.py's, or a model imported "
                                                     "with export.py); --chat talks to a chat model.")
    p.add_argument("--ckpt", metavar="PATH", default="out/stdlib-bpe2048/ckpt.safetensors",
                   help=f"the checkpoint: {CHECKPOINT_HELP} (default: %(default)s)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--prompt", metavar="TEXT", help="text to continue (default: a newline; '' starts from "
                                                        "<|endoftext|> with a BPE tokenizer); with --chat: the one "
                                                        "message to answer")
    which.add_argument("--prompt-file", metavar="FILE", help="the prompt (or with --chat the message) read from this "
                                                             "UTF-8 file, as it is")
    p.add_argument("--chat", action="store_true", help="chat with a chat model, in its own chat template: "
                                                       "interactive, or one answer to --prompt")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message to start the conversation")
    p.add_argument("--num-samples", type=int, metavar="N", default=1,
                   help=f"samples to draw from the one prompt, separated by a line {SEPARATOR}; sample k uses seed "
                        f"--seed + k (default: %(default)s; with --chat, answers to --prompt)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", default=300, help="tokens to generate (default: %(default)s)")
    t, c = DEFAULTS["text"], DEFAULTS["chat"]
    p.add_argument("--temperature", type=float, metavar="T",
                   help=f"0: greedy; <1 sharper, >1 flatter (default: {t[0]}; with --chat {c[0]})")
    p.add_argument("--top-k", type=int, metavar="K", help=f"sample among the k likeliest tokens; 0: all (default: "
                                                          f"{t[1]}; with --chat {c[1]})")
    p.add_argument("--top-p", type=float, metavar="P", help=f"nucleus sampling: the smallest set of tokens with this "
                                                            f"much probability; 1: all (default: {t[2]}; with --chat "
                                                            f"{c[2]})")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample when the text it produced reaches TEXT (not printed, nor what follows); "
                        "repeatable, e.g. "
                        "--stop $'\\n\\n' --stop 'User:'")
    p.add_argument("--ignore-eos", action="store_true",
                   help="plain text: go on past the model's end-of-text token (by default a sample from a model that "
                        "names one, as imported models and --sft runs do, ends there, the token not printed; other "
                        "runs of train.py name none)")
    p.add_argument("--seed", type=int, metavar="N", default=None, help="seed for reproducible samples (default: random)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="numpy (CPU) or cupy (GPU)")
    args = p.parse_args(argv)
    mode = DEFAULTS["chat" if args.chat else "text"]
    for name, default in zip(("temperature", "top_k", "top_p"), mode):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if (args.max_new_tokens < 0 or not 0 <= args.temperature < math.inf or args.top_k < 0
            or not 0 < args.top_p <= 1 or (args.seed is not None and args.seed < 0) or args.num_samples < 1):
        raise UserError("need --max-new-tokens >= 0, a finite --temperature >= 0, --top-k >= 0, "
                        "0 < --top-p <= 1, --seed >= 0 and --num-samples >= 1")
    if args.system is not None and not args.chat:
        raise UserError("--system needs --chat")
    if args.ignore_eos and args.chat:
        raise UserError("--ignore-eos is for plain text: --chat always ends a reply at the end of its turn")
    if "" in args.stop:
        raise UserError("--stop needs a non-empty text")
    if args.chat and args.prompt is None and args.prompt_file is None and args.num_samples > 1:
        raise UserError("--num-samples with --chat needs --prompt (or --prompt-file): the one message to answer")
    if args.prompt is None and args.prompt_file is None and not args.chat:
        args.prompt = "\n"
    return args


def read_prompt_file(path):
    """--prompt-file: the file's text, exactly (strict UTF-8, bpe.read_text); UserError naming it otherwise."""
    try:
        return read_text(path)
    except UserError as e:
        raise type(e)(f"--prompt-file: {e}") from None


def run(args):
    if args.prompt_file is not None:
        args.prompt = read_prompt_file(args.prompt_file)
    m = load_model(args.ckpt, args.backend)
    inference.pack_for_inference(m.gm, m.params, m.cfg)    # the weights laid out for decoding
    if args.chat:
        chat_session(m, args)
        return
    info = m.meta.get("chat")
    check_memory(m, len(chat.with_bos(info, encode_prompt(m.tokenizer, args.prompt))), args.max_new_tokens)
    ends = chat.from_meta(m.meta, m.tokenizer)
    stop_ids = set() if args.ignore_eos or ends is None else set(ends["stop_ids"])
    for k in range(args.num_samples):
        if k:
            print(SEPARATOR)
        stream(m.params, m.cfg, m.tokenizer, m.gm, args.prompt, args.max_new_tokens, args.temperature,
               args.top_k or None, args.top_p if args.top_p < 1.0 else None, sample_seed(args, k), info=info,
               stops=args.stop, stop_ids=stop_ids)


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, 1 for a failure (a missing or
    corrupt checkpoint, a prompt the tokenizer cannot encode); 130 on Ctrl-C."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
