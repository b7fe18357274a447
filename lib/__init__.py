"""
lib: the library the programs (train.py, sample.py, export.py, eval.py, plot.py) are built from. The model
itself is gpt_numpy.py, and the tokenizer's algorithm bpe.py, at the root, where a reader finds them first;
everything here sits between them and the programs, and no module here imports a program.

    files              atomic writes, whole folders replaced at once, locks, download-once, JSON lines
    backend            the model module to run: gpt_numpy, or gpt_cupy on a GPU
    tokenizer          character and BPE tokenizers by kind, their text form, prompts
    tokenizer_files    the tokenizer files of other tools: GPT-2's, tiktoken's, tokenizer.json, GGUF's
    data               corpora, the tokenizer and token caches, the batch sampler
    checkpoint         the checkpoint file; load_model for every program
    memory             what a run or a generation needs, refused up front when it cannot fit
    train_config, runs train.py's config and its checks; how a run starts (--resume, --init-from, data)
    generation         sampling, generate_stream, the KV session of a chat
    inference          the KV-cache forward's inference block; the weights' memory layout for it
    model_checks       the model's input checks (gpt_numpy calls them)
    parallel           train.py --threads: a step's shards on N threads
    lora, mixed_precision   the bookkeeping of LoRA runs; float16 steps with loss scaling
    chat_template, sft, scoring, dist   chat templates; instruction data; evaluation; MPI data parallel
    hf, peft_adapter, gguf_model   Hugging Face Llama folders both ways; PEFT LoRA adapters; GGUF files both ways
"""
