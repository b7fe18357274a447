"""
sample.py: stream text from a checkpoint written by train.py, token by token, with the KV cache
(lib/generation.py).

    python sample.py                                            # the default job's checkpoint, prompt "\\n"
    python sample.py --ckpt out/stdlib-bpe2048 --prompt "def " --max-new-tokens 300
    python sample.py --ckpt out/tinyshakespeare-char/ckpt.safetensors --prompt "ROMEO:" \\
        --temperature 0.8 --top-k 200 --seed 1
    python sample.py --backend cupy ...                         # generate on the GPU
    python sample.py --ckpt out/smollm2 --chat                  # chat with an imported chat model
    python sample.py --ckpt out/smollm2 --chat --system "Answer in French." --prompt "Hi!"   # one answer

The checkpoint carries its tokenizer, so nothing else is needed. Each token's bytes go through an
incremental UTF-8 decoder before printing, so a character split over two tokens (an emoji, "é" in a
byte-level BPE) prints whole once its last byte arrives.

--chat talks to a chat model (imported with export.py --import-gguf / --import-hf, or fine-tuned here with
train.py --sft): each turn renders the whole conversation with the model's own chat template
(chat_template.py), feeds the model what is new since the last turn (the rest stays in the KV cache,
generation.KVSession), generates the reply token by token and stops at the template's end-of-turn token.
Interactive: type a message, Enter; Ctrl-D or Ctrl-C ends.
"""

import codecs
import math
import sys

from lib import chat_template as chat, generation, memory
from lib.checkpoint import CHECKPOINT_HELP, load_model
from lib.tokenizer import encode_prompt
from errors import ArgumentParser, UserError, run_main


def stream(params, cfg, tok, gm, prompt, max_new_tokens, temperature, top_k, top_p, seed, out=None, info=None):
    """Write the prompt, then each new token's text as soon as it is complete UTF-8. Returns the new ids.
    info: the checkpoint's chat metadata, whose add_bos puts BOS before the prompt (not written out)."""
    out = out or sys.stdout
    shown = encode_prompt(tok, prompt)                                  # the prompt, written out
    ids = chat.with_bos(info, shown)                                    # what the model reads
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out.write(dec.decode(tok.decode_bytes(shown)))
    out.flush()
    new = []
    for i in generation.generate_stream(gm, params, ids, cfg, max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed):
        new.append(i)
        out.write(dec.decode(tok.decode_bytes([i])))      # "" while a character is still incomplete
        out.flush()
    out.write(dec.decode(b"", final=True) + "\n")
    out.flush()
    return new


def check_memory(m, prompt_len, new_tokens):
    """Refuse (one line naming memory.py's estimate) a generation whose weights, KV cache and prefill
    cannot fit."""
    need = memory.generation_bytes(m.cfg, prompt_len, new_tokens, memory.kv_cache_positions(m.cfg, prompt_len, new_tokens))
    memory.check_fits(need, f"sampling from {m.path} (context {m.cfg.max_seq_len:,})", m.gm,
                      hint="a shorter --prompt or fewer --max-new-tokens")


def reply(m, info, messages, args, out=None, session=None):
    """Stream the model's answer to `messages` (rendered with its chat template) to `out`; returns its
    text, without the end-of-turn token that stopped it. session: the conversation's KVSession, so that
    a turn feeds the model only what is new since the last one."""
    out = out or sys.stdout
    ids = chat.prompt_ids(info, m.tokenizer, messages)
    stop = set(info["stop_ids"])
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    new = []
    for i in generation.generate_stream(m.gm, m.params, ids, m.cfg, args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1.0 else None,
                                  seed=args.seed, stop_ids=stop, session=session):
        if i in stop:
            break
        new.append(i)
        out.write(dec.decode(m.tokenizer.decode_bytes([i])))
        out.flush()
    out.write(dec.decode(b"", final=True) + "\n")
    out.flush()
    return m.tokenizer.decode(new)


def chat_session(m, args):
    """--chat: one answer to --prompt, or turns read from the terminal until end of input. The whole
    conversation is the model's prompt each turn (its history), but only what is new since the last turn
    goes through the model: the rest is in the KV cache kept between turns."""
    info = chat.from_meta(m.meta, m.tokenizer)
    if info is None:
        raise UserError(f"{m.path} has no chat template: --chat needs a chat model imported with export.py "
                        f"--import-gguf or --import-hf (e.g. SmolLM2-135M-Instruct)")
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
        messages.append({"role": "assistant", "content": reply(m, info, messages, args, session=session)})
        if args.prompt is not None:
            return


def parse_args(argv):
    p = ArgumentParser(prog="sample.py", description="Stream text from a checkpoint (train.py's, or a model imported "
                                                     "with export.py); --chat talks to a chat model.")
    p.add_argument("--ckpt", metavar="PATH", default="out/stdlib-bpe2048/ckpt.safetensors",
                   help=f"the checkpoint: {CHECKPOINT_HELP} (default: %(default)s)")
    p.add_argument("--prompt", metavar="TEXT", help="text to continue (default: a newline; '' starts from "
                                                  "<|endoftext|> with a BPE tokenizer); with --chat: the one "
                                                  "message to answer")
    p.add_argument("--chat", action="store_true", help="chat with a chat model, in its own chat template: "
                                                       "interactive, or one answer to --prompt")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message to start the conversation")
    p.add_argument("--max-new-tokens", type=int, metavar="N", default=300, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, metavar="T", default=0.8, help="0: greedy; <1 sharper, >1 flatter (default: %(default)s)")
    p.add_argument("--top-k", type=int, metavar="K", default=200, help="sample among the k likeliest tokens; 0: all (default: %(default)s)")
    p.add_argument("--top-p", type=float, metavar="P", default=1.0, help="nucleus sampling: the smallest set of tokens with this "
                                                            "much probability; 1: all (default: %(default)s)")
    p.add_argument("--seed", type=int, metavar="N", default=None, help="seed for reproducible samples (default: random)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="numpy (CPU) or cupy (GPU)")
    args = p.parse_args(argv)
    if (args.max_new_tokens < 0 or not 0 <= args.temperature < math.inf or args.top_k < 0
            or not 0 < args.top_p <= 1 or (args.seed is not None and args.seed < 0)):
        raise UserError("need --max-new-tokens >= 0, a finite --temperature >= 0, --top-k >= 0, "
                        "0 < --top-p <= 1 and --seed >= 0")
    if args.system is not None and not args.chat:
        raise UserError("--system needs --chat")
    if args.prompt is None and not args.chat:
        args.prompt = "\n"
    return args


def run(args):
    m = load_model(args.ckpt, args.backend)
    if args.chat:
        chat_session(m, args)
    else:
        info = m.meta.get("chat")
        check_memory(m, len(chat.with_bos(info, encode_prompt(m.tokenizer, args.prompt))), args.max_new_tokens)
        stream(m.params, m.cfg, m.tokenizer, m.gm, args.prompt, args.max_new_tokens, args.temperature,
               args.top_k or None, args.top_p if args.top_p < 1.0 else None, args.seed, info=info)


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, 1 for a failure (a missing or
    corrupt checkpoint, a prompt the tokenizer cannot encode); 130 on Ctrl-C."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
