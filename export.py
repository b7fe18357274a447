"""
export.py: our models to Hugging Face and to llama.cpp, and their files back; the command line over the
interop modules lib/hf.py (Hugging Face Llama folders, both ways: the name mapping and why it is exact),
lib/peft_adapter.py (a LoRA run's adapters as a PEFT adapter) and lib/gguf_model.py (llama.cpp's GGUF
files, both ways). Here: the flags, which way to go, the messages, and how outputs are written (whole,
refused if not empty or if they exist, --force; never where a source is read from).

Export writes a directory that `transformers` loads with no code of ours, as a LlamaForCausalLM:

    python export.py --ckpt out/stdlib-bpe2048 --out export/stdlib-bpe2048

    from transformers import AutoModelForCausalLM, AutoTokenizer     # then in Python, with transformers
    model = AutoModelForCausalLM.from_pretrained("export/stdlib-bpe2048")
    tok = AutoTokenizer.from_pretrained("export/stdlib-bpe2048")

and a GGUF file that llama.cpp runs (llama-cli, llama-server, Ollama, LM Studio, llama-cpp-python): the
weights in float32, float16 or 8-bit (Q8_0), the tokenizer as llama.cpp's byte-level BPE, the chat template
and special tokens (docs/pretrained.md, "Export to llama.cpp"):

    python export.py --ckpt out/stdlib-bpe2048 --gguf export/stdlib-bpe2048.gguf --type q8_0
    llama-cli -m export/stdlib-bpe2048.gguf -p "def read_lines(path):"

Import reads a local Hugging Face Llama-architecture directory (config.json, model.safetensors or its
shards, tokenizer.json of the byte-level BPE kind) and writes it as one of our checkpoints, the weights
alone (lib/checkpoint.save_imported), which sample.py reads; in Python, lib.hf.import_hf(dir) gives
(params, cfg, tok):

    python export.py --import-hf path/to/hf-llama --out out/imported
    python sample.py --ckpt out/imported --prompt "Once upon a time"

llama.cpp's GGUF files import the same way (docs/pretrained.md has a walk-through):

    python export.py --import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2
    python sample.py --ckpt out/smollm2 --chat

An import is refused (one line naming the file and the key or tensor) unless every program can then read
the checkpoint: the loader's own checks run before it is written (checkpoint.check_importable).
The chat template of an imported model and the special tokens it uses go into the checkpoint's metadata
("chat"), for `sample.py --chat`, and back into tokenizer_config.json or the GGUF file on export.

A LoRA run (train.py --lora-rank) exports as its merged model (W + (alpha/r) A @ B), and with
`--peft-adapter DIR2` also as a PEFT LoRA adapter for its base model, so that
`peft.PeftModel.from_pretrained(base, DIR2)` computes what our model computes. `--peft-base DIR3` writes
the base model there too and names it in adapter_config.json (base_model_name_or_path, as an absolute
path: PEFT reads a relative one from the current folder, not the adapter's), so that
`AutoPeftModelForCausalLM.from_pretrained(DIR2)` finds it; without it, a base imported from a Hugging Face
folder is named by that folder, any other base by nothing (null: give PeftModel the base yourself):

    python export.py --ckpt out/chat-from-base --out export/merged --peft-adapter export/adapter \\
        --peft-base export/base

    from peft import AutoPeftModelForCausalLM                            # then, with peft
    model = AutoPeftModelForCausalLM.from_pretrained("export/adapter")
"""

import argparse
import itertools
import sys
from pathlib import Path

import gpt_numpy as gn
from errors import ArgumentParser, FileFormatError, UsageError, UserError, run_main
from lib import gguf_model, lora as lora_lib
from lib.checkpoint import (CHECKPOINT_HELP, Checkpoint, load_checkpoint, load_model, lora_base_path,
                            open_lora_run, read_meta, save_imported)
from lib.files import OUTPUT_MARK, mark_output_folder, write_folder
from lib.hf import export_hf, hf_chat_info, import_hf
from lib.memory import LONGEST_CONTEXT
from lib.peft_adapter import export_peft_adapter


# ----------------------------------------------------------------------------------------------------
# The command line

EPILOG = """examples:
  python export.py --ckpt out/stdlib-bpe2048 --out export/stdlib-bpe2048      # -> transformers
  python export.py --ckpt out/stdlib-bpe2048 --gguf export/stdlib-bpe2048.gguf --type q8_0   # -> llama.cpp
  python export.py --ckpt out/chat-from-base --out export/merged --peft-adapter export/adapter \\
      --peft-base export/base                                                  # a LoRA run, for peft
  python export.py --import-hf path/to/llama-dir --out out/imported --block-size 1024
  python sample.py --ckpt out/imported --prompt "Once upon a time"
  python export.py --import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2   # llama.cpp's files
  python sample.py --ckpt out/smollm2 --chat

Then, in Python with transformers installed:
  from transformers import AutoModelForCausalLM, AutoTokenizer
  model = AutoModelForCausalLM.from_pretrained("export/stdlib-bpe2048")
  tok = AutoTokenizer.from_pretrained("export/stdlib-bpe2048")
or with llama.cpp: llama-cli -m export/stdlib-bpe2048.gguf -p "Once upon a time"
"""


def context_length(text):
    """--block-size's type: a positive integer no longer than any context this code runs."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= n <= LONGEST_CONTEXT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {LONGEST_CONTEXT:,}, got {n:,}")
    return n


def parse_args(argv):
    p = ArgumentParser(
        prog="export.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Convert between our training checkpoints and Hugging Face Llama directories\n"
                    "(config.json, model.safetensors, tokenizer.json) or llama.cpp's GGUF files.")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--ckpt", metavar="PATH",
                     help=f"export this checkpoint to the folder --out and/or the GGUF file --gguf: "
                          f"{CHECKPOINT_HELP}")
    way.add_argument("--import-hf", metavar="DIR",
                     help="import this Hugging Face Llama folder into the checkpoint --out")
    way.add_argument("--import-gguf", metavar="FILE",
                     help="import this llama.cpp GGUF file (a llama model, any quantization the gguf package "
                          "reads) into the checkpoint --out")
    p.add_argument("--out", metavar="PATH",
                   help="export: the Hugging Face folder to write; import: a .safetensors file or a folder for "
                        "ckpt.safetensors. Never the folder a source is in, or one inside it")
    p.add_argument("--gguf", metavar="FILE",
                   help="export (--ckpt): also or instead write the model as a llama GGUF file for llama.cpp, "
                        "with its tokenizer, chat template and special tokens")
    p.add_argument("--type", choices=gguf_model.GGUF_TYPES, default=None,
                   help="--gguf: how the matrices are stored: f32 (exact, the default), f16 or q8_0 (8 bits, "
                        "about a quarter of f32's size); norms stay f32")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out (or an existing --gguf) whole (never a folder that holds "
                        "folders); without it, a non-empty --out (another model, a training run) is refused")
    p.add_argument("--block-size", "--max-seq-len", dest="block_size", type=context_length, metavar="N",
                   help="import: the context length to use (default: the model's own, e.g. 8192); "
                        "--max-seq-len is the older name")
    p.add_argument("--peft-adapter", metavar="DIR",
                   help="export of a LoRA run (train.py --lora-rank): also write its adapters to DIR as a PEFT "
                        "LoRA adapter for the base model (--out gets the merged model)")
    p.add_argument("--peft-base", metavar="DIR",
                   help="with --peft-adapter: also write the base model to DIR as a Hugging Face folder, and "
                        "name it (its absolute path) in the adapter's base_model_name_or_path")
    args = p.parse_args(argv)
    if args.ckpt and args.block_size is not None:
        raise UserError("--block-size (--max-seq-len) applies to --import-hf and --import-gguf only")
    if args.ckpt and not (args.out or args.gguf):
        raise UserError("--ckpt needs --out (a Hugging Face folder) or --gguf (a llama.cpp file), or both")
    if not args.ckpt and not args.out:
        raise UserError("--out is required (the checkpoint to write)")
    if args.gguf and not args.ckpt:
        raise UserError("--gguf applies to --ckpt (the export of a checkpoint)")
    if args.type and not args.gguf:
        raise UserError("--type applies to --gguf")
    if args.peft_adapter and not args.ckpt:
        raise UserError("--peft-adapter applies to --ckpt (the export of a LoRA run)")
    if args.peft_adapter and not args.out:
        raise UserError("--peft-adapter needs --out, the folder for the merged model")
    if args.peft_base and not args.peft_adapter:
        raise UserError("--peft-base applies to --peft-adapter")
    for (f1, p1), (f2, p2) in itertools.combinations(outputs_of(args).items(), 2):
        relation = overlap(p1, p2)
        if relation:
            raise UserError(f"{f1} {p1} {relation} {f2} {p2}: each output needs a place of its own "
                            f"(one would replace the other)")
    args.type = args.type or "f32"
    return args


def overlap(a, b):
    """How path a sits against path b: "is", "contains", "lies inside", or None for apart (symlinks and
    relative spellings resolved). Example: overlap("out/run", "out/run/ckpt.safetensors") -> "contains"."""
    a, b = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return "is" if a == b else "contains" if a in b.parents else "lies inside" if b in a.parents else None


def check_apart(outputs, sources):
    """Refuse (UsageError, exit 2) an output that is, contains or lies inside a source: `--out RUN --force`
    would delete the run it exports (its weights, AdamW state and log). outputs: {flag: path}; sources:
    {description: path}, a checkpoint's file and its run folder, a LoRA run's base, an imported file or
    folder."""
    for flag, out in outputs.items():
        for what, src in sources.items():
            relation = overlap(out, src)
            if relation:
                raise UsageError(f"{flag} {out} {relation} {what} {src}: export.py never writes where it reads; "
                                 f"choose another {flag}")


def checkpoint_sources(path, what="the checkpoint"):
    """A checkpoint file and, when it is a run's folder (marked by train.py or an import), that folder."""
    path = Path(path)
    path = path / "ckpt.safetensors" if path.is_dir() else path
    out = {what: path}
    if (path.parent / OUTPUT_MARK).exists():
        out[f"the run folder of {what}"] = path.parent
    return out


# ----------------------------------------------------------------------------------------------------
# The work: each way, written whole to --out

def write_import(out, params, cfg, tok, source, force=False, chat=None):
    """save_imported to --out: a .safetensors file (refused if it exists, unless force), or a folder
    written whole (lib.files.write_folder: refused if not empty, unless force), marked as a run folder."""
    out = Path(out)
    if out.suffix == ".safetensors":
        if out.exists() and not force:
            raise UserError(f"--out {out} exists; pass --force to replace it")
        return save_imported(out, params, cfg, tok, source, chat)

    def write(d):
        save_imported(d, params, cfg, tok, source, chat)
        mark_output_folder(d)
    return write_folder(out, write, force) / "ckpt.safetensors"


def write_hf(out, params, cfg, tok, chat, force, what="--out"):
    """export_hf to a folder written whole and marked as this project's output, so that a folder corpus
    (train.py --data .) leaves it out as it leaves out run folders."""
    def write(d):
        export_hf(params, cfg, tok, d, chat)
        mark_output_folder(d)
    return write_folder(out, write, force, what=what)


def write_gguf(path, params, cfg, tok, chat, qtype, force):
    """--gguf FILE: refused if it exists (unless force) or is a folder; written atomically."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"--gguf {path} is a folder; expected a file name such as {path / 'model.gguf'}")
    if path.exists() and not force:
        raise UserError(f"--gguf {path} exists; pass --force to replace it")
    counts = gguf_model.write_gguf(path, params, cfg, tok, chat, qtype, name=Path(path).stem, progress=True)
    pre = gguf_model.to_gguf_fields(tok)["tokenizer.ggml.pre"]
    print(f"wrote {path}: llama GGUF, {qtype} ({', '.join(f'{n} {t}' for t, n in sorted(counts.items()))} tensors), "
          f"{gn.num_params(params):,} parameters, context {cfg.max_seq_len}, {tok.vocab_size}-token byte-level BPE "
          f"(pre-tokenizer {pre})" + (", chat template" if (chat or {}).get("template") else ""), file=sys.stderr)


def hf_base_name(base_meta):
    """The Hugging Face folder a LoRA run's base was imported from (absolute), if it still holds a model."""
    src = base_meta.get("imported_from")
    if isinstance(src, str) and (Path(src) / "config.json").is_file():
        return str(Path(src).resolve())
    return None


def export_lora_run(args):
    """--ckpt RUN --out DIR --peft-adapter DIR2 [--peft-base DIR3]: the merged model to DIR, the PEFT adapter
    to DIR2 (and the base model to DIR3), each written whole (lib.files.write_folder: a non-empty folder is
    refused unless --force); --gguf FILE gets the merged model too."""
    ck = load_checkpoint(args.ckpt)
    if "lora" not in ck.meta:
        raise UserError(f"--peft-adapter: {ck.path} is not a LoRA run's checkpoint (train one with train.py "
                        f"--init-from CKPT --lora-rank R)")
    base_path = lora_base_path(ck)
    check_apart(outputs_of(args), {**checkpoint_sources(ck.path, "the LoRA run"),
                                   **checkpoint_sources(base_path, "its base checkpoint")})
    base, adapters, lora, cfg = open_lora_run(ck, gn)
    base_meta = read_meta(base_path) or {}
    merged, tok = lora_lib.merge({**base, **adapters}, lora), ck.tokenizer()
    chat = ck.meta.get("chat") or base_meta.get("chat")             # the run's template, else its base's
    write_hf(args.out, merged, cfg, tok, chat, args.force)
    if args.gguf:
        write_gguf(args.gguf, merged, cfg, tok, chat, args.type, args.force)
    if args.peft_base:
        write_hf(args.peft_base, base, cfg, tok, base_meta.get("chat"), args.force, what="--peft-base")
    base_name = str(Path(args.peft_base).expanduser().resolve()) if args.peft_base else hf_base_name(base_meta)

    def write_adapter(d):
        export_peft_adapter(adapters, lora, cfg, d, base_name)
        mark_output_folder(d)
    write_folder(args.peft_adapter, write_adapter, args.force, what="--peft-adapter")
    n = sum(int(v.size) for v in adapters.values())
    print(f"wrote {args.out}: LlamaForCausalLM with the adapters merged, {gn.num_params(base):,} parameters; "
          f"{args.peft_adapter}: a PEFT LoRA adapter (rank {lora.rank}, {n:,} parameters of ours) for the base "
          f"{base_path}" + (f", written to {args.peft_base}" if args.peft_base else ""), file=sys.stderr)
    if base_name is None:
        print(f"note: {args.peft_adapter}/adapter_config.json names no base model (base_model_name_or_path null): "
              f"load the base yourself (PeftModel.from_pretrained(base, DIR)), or export again with --peft-base DIR "
              f"to write the base and name it", file=sys.stderr)


def outputs_of(args):
    return {f: v for f, v in (("--out", args.out), ("--gguf", args.gguf), ("--peft-adapter", args.peft_adapter),
                              ("--peft-base", args.peft_base)) if v}


def run(args):
    if args.peft_adapter:
        export_lora_run(args)
    elif args.ckpt:
        m = load_model(args.ckpt)                   # gpt_numpy as the backend: arrays stay NumPy
        sources = checkpoint_sources(m.path)
        if "lora" in m.meta:
            ck = Checkpoint(m.path, {}, {}, {}, m.meta)             # its metadata: where the base is
            sources.update(checkpoint_sources(lora_base_path(ck), "its base checkpoint"))
        check_apart(outputs_of(args), sources)
        chat = m.meta.get("chat")
        if args.out:
            write_hf(args.out, m.params, m.cfg, m.tokenizer, chat, args.force)
            print(f"wrote {args.out}: LlamaForCausalLM with {gn.num_params(m.params):,} parameters", file=sys.stderr)
        if args.gguf:
            write_gguf(args.gguf, m.params, m.cfg, m.tokenizer, chat, args.type, args.force)
    elif args.import_hf:
        check_apart(outputs_of(args), {"the imported folder": args.import_hf})
        params, cfg, tok = import_hf(args.import_hf, args.block_size)
        if tok is None:
            raise FileFormatError(f"{args.import_hf} has no tokenizer.json, and a checkpoint carries its tokenizer")
        path = write_import(args.out, params, cfg, tok, args.import_hf, args.force,
                            hf_chat_info(args.import_hf, tok))
        print(f"wrote {path}: {gn.num_params(params):,} parameters, context {cfg.max_seq_len}", file=sys.stderr)
    else:
        check_apart(outputs_of(args), {"the imported file": args.import_gguf})
        imp = gguf_model.read_gguf(args.import_gguf, progress=True, max_seq_len=args.block_size)
        cfg = imp.cfg
        path = write_import(args.out, imp.params, cfg, imp.tok, args.import_gguf, args.force, imp.chat)
        print(f"wrote {path}: {gn.num_params(imp.params):,} parameters, {cfg.n_layer} layers, "
              f"{cfg.n_head} query / {cfg.n_kv_head} key-value heads, context {cfg.max_seq_len}, "
              f"vocabulary {imp.tok.vocab_size}" + (", chat template" if imp.chat.get("template") else ""),
              file=sys.stderr)


def main(argv=None):
    """Exit status 0; `error: <one line>` and 2 for a bad command line (an output where a source is
    included), 1 for a failure (a file that is missing, corrupt or maps to no Llama); 130 on Ctrl-C."""
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
