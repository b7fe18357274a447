"""
export.py: our models to Hugging Face and back, and llama.cpp's GGUF files in; the command line over the
interop modules lib/hf.py (Hugging Face Llama folders, both ways: the name mapping and why it is exact),
lib/peft_adapter.py (a LoRA run's adapters as a PEFT adapter) and lib/gguf_model.py (GGUF files). Here:
the flags, which way to go, the messages, and how --out is written (whole, refused if not empty, --force).

Export writes a directory that `transformers` loads with no code of ours, as a LlamaForCausalLM:

    python export.py --ckpt out/stdlib-bpe2048 --out export/stdlib-bpe2048

    from transformers import AutoModelForCausalLM, AutoTokenizer     # then in Python, with transformers
    model = AutoModelForCausalLM.from_pretrained("export/stdlib-bpe2048")
    tok = AutoTokenizer.from_pretrained("export/stdlib-bpe2048")

Import reads a local Hugging Face Llama-architecture directory (config.json, model.safetensors or its
shards, tokenizer.json of the byte-level BPE kind) and writes it as one of our checkpoints, the weights
alone (lib/checkpoint.save_imported), which sample.py reads; in Python, lib.hf.import_hf(dir) gives
(params, cfg, tok):

    python export.py --import-hf path/to/hf-llama --out out/imported
    python sample.py --ckpt out/imported --prompt "Once upon a time"

llama.cpp's GGUF files import the same way (docs/pretrained.md has a walk-through):

    python export.py --import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2
    python sample.py --ckpt out/smollm2 --chat

The chat template of an imported model and the special tokens it uses go into the checkpoint's metadata
("chat"), for `sample.py --chat`, and back into tokenizer_config.json on export.

A LoRA run (train.py --lora-rank) exports as its merged model (W + (alpha/r) A @ B), and with
`--peft-adapter DIR2` also as a PEFT LoRA adapter for its base model, so that
`peft.PeftModel.from_pretrained(base, DIR2)` computes what our model computes:

    python export.py --ckpt out/chat-from-base --out export/merged --peft-adapter export/adapter
    python export.py --ckpt out/base --out export/base             # the base, if it is not on the Hub already

    base = AutoModelForCausalLM.from_pretrained("export/base")           # then, with peft
    model = PeftModel.from_pretrained(base, "export/adapter")
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import gpt_numpy as gn
from errors import ArgumentParser, FileFormatError, UserError, run_main
from lib import gguf_model, lora as lora_lib
from lib.checkpoint import CHECKPOINT_HELP, load_checkpoint, load_model, open_lora_run, read_meta, save_imported
from lib.files import mark_output_folder, write_folder
from lib.hf import export_hf, hf_chat_info, import_hf
from lib.peft_adapter import export_peft_adapter


# ----------------------------------------------------------------------------------------------------
# The command line

EPILOG = """examples:
  python export.py --ckpt out/stdlib-bpe2048 --out export/stdlib-bpe2048      # -> transformers
  python export.py --ckpt out/chat-from-base --out export/merged --peft-adapter export/adapter   # a LoRA run
  python export.py --import-hf path/to/llama-dir --out out/imported --max-seq-len 1024
  python sample.py --ckpt out/imported --prompt "Once upon a time"
  python export.py --import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2   # llama.cpp's files
  python sample.py --ckpt out/smollm2 --chat

Then, in Python with transformers installed:
  from transformers import AutoModelForCausalLM, AutoTokenizer
  model = AutoModelForCausalLM.from_pretrained("export/stdlib-bpe2048")
  tok = AutoTokenizer.from_pretrained("export/stdlib-bpe2048")
"""


def parse_args(argv):
    p = ArgumentParser(
        prog="export.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Convert between our training checkpoints and Hugging Face Llama directories\n"
                    "(config.json, model.safetensors, tokenizer.json); import llama.cpp's GGUF files.")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--ckpt", metavar="PATH",
                     help=f"export this checkpoint to the folder --out: {CHECKPOINT_HELP}")
    way.add_argument("--import-hf", metavar="DIR",
                     help="import this Hugging Face Llama folder into the checkpoint --out")
    way.add_argument("--import-gguf", metavar="FILE",
                     help="import this llama.cpp GGUF file (a llama model, any quantization the gguf package "
                          "reads) into the checkpoint --out")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="export: the folder to write; import: a .safetensors file or a folder for ckpt.safetensors")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out whole (never a folder that holds folders); without it, a "
                        "non-empty --out (another model, a training run) is refused")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="import: context length to use (default: the model's own, e.g. 8192)")
    p.add_argument("--peft-adapter", metavar="DIR",
                   help="export of a LoRA run (train.py --lora-rank): also write its adapters to DIR as a PEFT "
                        "LoRA adapter for the base model (--out gets the merged model)")
    args = p.parse_args(argv)
    if args.ckpt and args.max_seq_len is not None:
        raise UserError("--max-seq-len applies to --import-hf and --import-gguf only")
    if args.peft_adapter and not args.ckpt:
        raise UserError("--peft-adapter applies to --ckpt (the export of a LoRA run)")
    return args


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


def export_lora_run(ckpt, out, adapter_dir, force=False):
    """--ckpt RUN --out DIR --peft-adapter DIR2: the merged model to DIR, the PEFT adapter to DIR2, each
    written whole (lib.files.write_folder: a non-empty folder is refused unless force)."""
    ck = load_checkpoint(ckpt)
    if "lora" not in ck.meta:
        raise UserError(f"--peft-adapter: {ck.path} is not a LoRA run's checkpoint (train one with train.py "
                        f"--init-from CKPT --lora-rank R)")
    base, adapters, lora, cfg = open_lora_run(ck, gn)
    base_meta = read_meta(ck.meta["lora"]["base"]["path"]) or {}
    merged, tok = lora_lib.merge({**base, **adapters}, lora), ck.tokenizer()
    chat = ck.meta.get("chat") or base_meta.get("chat")             # the run's template, else its base's
    write_folder(out, lambda d: export_hf(merged, cfg, tok, d, chat), force)
    write_folder(adapter_dir, lambda d: export_peft_adapter(adapters, lora, cfg, d, base_meta.get("imported_from")),
                 force, what="--peft-adapter")
    n = sum(int(v.size) for v in adapters.values())
    print(f"wrote {out}: LlamaForCausalLM with the adapters merged, {gn.num_params(base):,} parameters; "
          f"{adapter_dir}: a PEFT LoRA adapter (rank {lora.rank}, {n:,} parameters of ours) for the base "
          f"{ck.meta['lora']['base']['path']}", file=sys.stderr)


def replace_context(cfg, n):
    """cfg with max_seq_len n (--max-seq-len); UserError for a bad n."""
    try:
        return replace(cfg, max_seq_len=n)
    except ValueError as e:
        raise UserError(f"--max-seq-len: {e}") from None


def run(args):
    if args.peft_adapter:
        export_lora_run(args.ckpt, args.out, args.peft_adapter, args.force)
    elif args.ckpt:
        m = load_model(args.ckpt)                   # gpt_numpy as the backend: arrays stay NumPy
        write_folder(args.out, lambda d: export_hf(m.params, m.cfg, m.tokenizer, d, m.meta.get("chat")), args.force)
        print(f"wrote {args.out}: LlamaForCausalLM with {gn.num_params(m.params):,} parameters", file=sys.stderr)
    elif args.import_hf:
        params, cfg, tok = import_hf(args.import_hf, args.max_seq_len)
        if tok is None:
            raise FileFormatError(f"{args.import_hf} has no tokenizer.json, and a checkpoint carries its tokenizer")
        path = write_import(args.out, params, cfg, tok, args.import_hf, args.force,
                            hf_chat_info(args.import_hf, tok))
        print(f"wrote {path}: {gn.num_params(params):,} parameters, context {cfg.max_seq_len}", file=sys.stderr)
    else:
        imp = gguf_model.read_gguf(args.import_gguf, progress=True)
        cfg = imp.cfg if args.max_seq_len is None else replace_context(imp.cfg, args.max_seq_len)
        path = write_import(args.out, imp.params, cfg, imp.tok, args.import_gguf, args.force, imp.chat)
        print(f"wrote {path}: {gn.num_params(imp.params):,} parameters, {cfg.n_layer} layers, "
              f"{cfg.n_head} query / {cfg.n_kv_head} key-value heads, context {cfg.max_seq_len}, "
              f"vocabulary {imp.tok.vocab_size}" + (", chat template" if imp.chat.get("template") else ""),
              file=sys.stderr)


def main(argv=None):
    """Exit status 0; `export.py: error: <one line>` and 2 for a bad command line, 1 for a failure (a
    file that is missing, corrupt or maps to no Llama); 130 on Ctrl-C."""
    return run_main(parse_args, run, argv, prefix="export.py: error: ")


if __name__ == "__main__":
    raise SystemExit(main())
