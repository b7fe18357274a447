"""
sample.py: stream text from a checkpoint written by train.py, token by token, with the KV cache
(gpt_numpy.generate_stream).

    python sample.py                                            # the default job's checkpoint, prompt "\\n"
    python sample.py --ckpt out/stdlib-bpe2048 --prompt "def " --max-new-tokens 300
    python sample.py --ckpt out/tinyshakespeare-char/ckpt.safetensors --prompt "ROMEO:" \\
        --temperature 0.8 --top-k 200 --seed 1
    python sample.py --backend cupy ...                         # generate on the GPU

The checkpoint carries its tokenizer, so nothing else is needed. Each token's bytes go through an
incremental UTF-8 decoder before printing, so a character split over two tokens (an emoji, "é" in a
byte-level BPE) prints whole once its last byte arrives.
"""

import codecs
import math
import sys

import memory
from checkpoint import load_model
from data import encode_prompt
from errors import ArgumentParser, UserError


def stream(params, cfg, tok, gm, prompt, max_new_tokens, temperature, top_k, top_p, seed, out=None):
    """Write the prompt, then each new token's text as soon as it is complete UTF-8. Returns the new ids."""
    out = out or sys.stdout
    ids = encode_prompt(tok, prompt)
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out.write(dec.decode(tok.decode_bytes(ids)))
    out.flush()
    new = []
    for i in gm.generate_stream(params, ids, cfg, max_new_tokens, temperature=temperature, top_k=top_k,
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


def parse_args(argv):
    p = ArgumentParser(prog="sample.py", description="Stream text from a train.py checkpoint.")
    p.add_argument("--ckpt", metavar="PATH", default="out/stdlib-bpe2048/ckpt.safetensors",
                   help="checkpoint file, or the out dir holding ckpt.safetensors (default: %(default)s)")
    p.add_argument("--prompt", metavar="TEXT", default="\n", help="text to continue (default: a newline; '' starts from "
                                                  "<|endoftext|> with a BPE tokenizer)")
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
    return args


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line, 1 for a failure (a missing or
    corrupt checkpoint, a prompt the tokenizer cannot encode); 130 on Ctrl-C."""
    try:
        args = parse_args(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        m = load_model(args.ckpt, args.backend)
        check_memory(m, len(encode_prompt(m.tokenizer, args.prompt)), args.max_new_tokens)
        stream(m.params, m.cfg, m.tokenizer, m.gm, args.prompt, args.max_new_tokens, args.temperature,
               args.top_k or None, args.top_p if args.top_p < 1.0 else None, args.seed)
    except BrokenPipeError:                               # e.g. piped into `head`
        sys.stderr.close()
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
