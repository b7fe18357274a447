"""
scoring.py: how eval.py and train.py --eval-mc score a model, in one place: the perplexity of a text, and
multiple-choice benchmarks (HellaSwag and a generic format) scored as EleutherAI's lm-evaluation-harness
scores them, plus llm.c's per-token normalisation. A library: it reads files and returns numbers; the
programs print them.

    items = read_mc("hellaswag_val.jsonl", limit=100)     # [MCItem(context, choices, label, line)]
    reqs = encode_items(tok, items, cfg.max_seq_len)      # the harness's token ids, left-truncated to fit
    results = score_requests(gm, params, cfg, reqs)       # per item: each choice's log-likelihood, tokens
    mc_metrics(results)                                   # {"acc", "acc_norm", "acc_token_norm", *_stderr, ...}
    text = score_text(gm, params, cfg, ids, 128, 64)      # {"loss", "ppl", "tokens", ...} of a token stream

Multiple choice, the harness's way (lm_eval/api/task.py, api/model.py, models/huggingface.py):
- Each choice is a continuation of the context: (context, delimiter + choice), the delimiter " " by default
  (the harness's target_delimiter). Whitespace at the end of the context moves to the continuation.
- Context and continuation are tokenized together and split at the context's own token length:
  ctx = encode(context), cont = encode(context + continuation)[len(ctx):]. The model reads ctx + cont
  and the choice's log-likelihood is the sum of log p(cont[j] | everything before it).
- An empty context is replaced by a start token (<|endoftext|>; a char vocabulary's newline), unless the
  continuation already starts with it.
- Too long for the window of N = max_seq_len tokens: ctx + cont is cut to its last N + 1 tokens (the
  context loses its beginning) and the item is counted as truncated. A continuation of more than N tokens
  cannot be scored and is an error.
- Metrics, each the mean over items of 0/1 with the harness's standard error, sqrt(p (1 - p) / (n - 1)):
  acc            argmax of the summed log-likelihoods
  acc_norm       argmax of log-likelihood / len(choice) in characters (the harness's acc_norm)
  acc_token_norm argmax of log-likelihood / tokens, the mean per token (llm.c's hellaswag.py "acc_norm")
  Ties go to the first choice (np.argmax).

HellaSwag (the harness's hellaswag task, lm_eval/tasks/hellaswag/utils.py): the context is
preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) and each choice preprocess(ending),
where preprocess strips, turns " [title]" into ". ", drops every "[...]" and collapses double spaces.
A line with `ctx` but no ctx_a uses ctx in their place.

Text perplexity: the ids are cut into windows of N + 1 tokens that overlap by one token (the last token
of a window is the first of the next), so every token but the first is predicted exactly once, from the
earlier tokens of its window. With stride S < N each window starts S tokens after the previous one and
scores only the tokens no earlier window scored (its last S): every prediction then sees at least N - S
tokens of context (the sliding-window perplexity of Hugging Face's docs).
"""

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bpe import to_bytes
from errors import FileFormatError, UserError
from lib.files import fetch_once, read_jsonl
from lib.tokenizer import encode_prompt, encode_text

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


# ----------------------------------------------------------------------------------------------------
# Multiple-choice files: one JSON object per line, HellaSwag's fields or the generic ones

@dataclass
class MCItem:
    context: str
    choices: list               # strings, as scored (HellaSwag's preprocessed)
    label: int                  # index of the right choice
    line: int                   # 1-based line of the file, for messages
    source: str = ""            # the file


def hellaswag_preprocess(text):
    """The harness's hellaswag preprocess(). Example: " A man [title] is [step] here  now " -> "A man. is  here now"
    (brackets are artifacts of HellaSwag's WikiHow part)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_item(doc):
    """(context, choices) of a HellaSwag record, as the harness's process_docs builds them.
    subtle: str.capitalize() also lowercases the rest of ctx_b ("Then The" -> "Then the"): kept, as
    the harness does it."""
    if "ctx_a" in doc:
        ctx = doc["ctx_a"] + " " + doc.get("ctx_b", "").capitalize()
    else:
        ctx = doc["ctx"]
    label = doc.get("activity_label")
    query = hellaswag_preprocess((label + ": " if label is not None else "") + ctx)
    return query, [hellaswag_preprocess(e) for e in doc["endings"]]


def parse_mc_line(doc, where):
    """One JSON record -> (context, choices, label), checking every field; FileFormatError naming `where`."""
    def bad(why):
        raise FileFormatError(f"{where}: {why}")

    if not isinstance(doc, dict):
        bad(f"expected a JSON object, got {type(doc).__name__}")
    if "endings" in doc:                                       # HellaSwag
        texts = [doc.get(k) for k in ("ctx", "ctx_a", "ctx_b", "activity_label") if k in doc]
        if ("ctx" not in doc and "ctx_a" not in doc) or not all(isinstance(t, str) for t in texts):
            bad("a HellaSwag record needs a string `ctx` (or `ctx_a` and `ctx_b`)")
        if not isinstance(doc["endings"], list) or not all(isinstance(e, str) for e in doc["endings"]):
            bad("`endings` must be a list of strings")
        context, choices = hellaswag_item(doc)
    elif "choices" in doc:                                     # generic
        context, choices = doc.get("context"), doc["choices"]
        if not isinstance(context, str):
            bad("`context` must be a string")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            bad("`choices` must be a list of strings")
    else:
        bad("expected HellaSwag's fields (ctx, endings, label) or the generic ones (context, choices, label)")
    if len(choices) < 2:
        bad(f"{len(choices)} choice(s); a multiple-choice item needs at least 2")
    for i, c in enumerate(choices):
        if not c:
            bad(f"choice {i} is empty" + (" after HellaSwag's preprocessing" if "endings" in doc else ""))
    label = doc.get("label")
    if isinstance(label, str) and label.strip().isdigit():     # HellaSwag on the Hub spells it "0".."3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        bad(f"`label` must be the index of the right choice, got {json.dumps(label)}")
    if not 0 <= label < len(choices):
        bad(f"label {label} is out of range for {len(choices)} choices (0 .. {len(choices) - 1})")
    return context, list(choices), label


def read_mc(path, limit=None):
    """The items of a multiple-choice JSONL file (blank lines skipped), the first `limit` if given.
    Raises UserError for a missing file, FileFormatError naming the line for a bad one."""
    items = []
    for n, where, doc in read_jsonl(path):
        if limit is not None and len(items) >= limit:
            break
        items.append(MCItem(*parse_mc_line(doc, where), line=n, source=str(path)))
    if not items:
        raise FileFormatError(f"{path} holds no items")
    return items


def fetch_hellaswag(data_dir, log=print):
    """HellaSwag's official validation file (10042 items, 11 MB), downloaded once into
    <data_dir>/hellaswag/hellaswag_val.jsonl; later calls return the path without the network."""
    path = Path(data_dir) / "hellaswag" / "hellaswag_val.jsonl"
    return fetch_once(HELLASWAG_URL, path, "HellaSwag's validation set",
                      f"download {HELLASWAG_URL} by hand to {path}, or pass a local file with --mc", log)


# ----------------------------------------------------------------------------------------------------
# Tokens: the harness's split of (context, continuation), and the left-truncation to the window

@dataclass
class MCRequest:
    item: MCItem
    inputs: list                # per choice: (context ids, continuation ids), ctx + cont <= N + 1 tokens
    truncated: bool             # did some choice lose the beginning of its context?


def start_ids(tok, meta=None):
    """The token an empty context becomes: the harness's prefix token, the model's BOS if it has one, else
    its EOS (an imported model's metadata names them: SmolLM2's BOS is <|im_start|>); for a model
    without that metadata, encode_prompt(tok, ""): <|endoftext|>, which export.py writes as its BOS."""
    chat = (meta or {}).get("chat") if isinstance((meta or {}).get("chat"), dict) else {}
    special = getattr(tok, "special_tokens", None) or {}
    for key in ("bos_token", "eos_token"):
        if chat.get(key) in special:
            return [special[chat[key]]]
    return encode_prompt(tok, "")


def encode_pair(tok, context, continuation, start=None):
    """(context ids, continuation ids) as the harness's _encode_pair: trailing whitespace of the context
    moves to the continuation, both are encoded together and split at the context's own length.

    Example (GPT-2's BPE): ("The cat", " sat") -> ([464, 3797], [3332]).
    An empty context becomes the start token (`start`, by default encode_prompt(tok, "")); subtle: where
    the continuation already starts with that token, its first token is the context instead (the
    harness's rule)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        cont = [int(i) for i in encode_text(tok, continuation)]
        start = start or encode_prompt(tok, "")
        return (cont[:1], cont[1:]) if cont[:1] == start else (start, cont)
    whole = [int(i) for i in encode_text(tok, context + continuation)]
    ctx = [int(i) for i in encode_text(tok, context)]
    return ctx, whole[len(ctx):]


def encode_items(tok, items, window, delimiter=" ", start=None):
    """MCItems -> MCRequests: every choice encoded with encode_pair(context, delimiter + choice, start) and
    cut to the last window + 1 tokens as the harness cuts it. UserError naming the item if a choice cannot
    be scored (no token of its own, or longer than the window)."""
    reqs = []
    for item in items:
        inputs, truncated = [], False
        for i, choice in enumerate(item.choices):
            where = f"{item.source or 'item'}, line {item.line}, choice {i}"
            try:
                ctx, cont = encode_pair(tok, item.context, delimiter + choice, start)
            except UserError as e:                         # e.g. a character the char vocabulary lacks
                raise UserError(f"{where}: {e}") from None
            if not cont:
                raise UserError(f"{where}: the choice has no tokens of its own (the tokenizer merged it into "
                                f"the context); use a --delimiter such as ' '")
            if len(cont) > window:
                raise UserError(f"{where}: the choice is {len(cont)} tokens long, more than the model's "
                                f"window of {window}")
            if len(ctx) + len(cont) > window + 1:          # the harness keeps the last N + 1 tokens
                ctx, truncated = ctx[len(ctx) + len(cont) - (window + 1):], True
            inputs.append((ctx, cont))
        reqs.append(MCRequest(item, inputs, truncated))
    return reqs


# ----------------------------------------------------------------------------------------------------
# The model's side: log-probabilities of given tokens

# token_logprobs' exp on the CPU, in blocks of rows of about this many bytes: a block stays in the core's
# cache between its subtract, exp and sum (in one pass over (B, T, V) each of them went through memory:
# a 512-token window pair of SmolLM2's logits 0.126 s at once, 0.056 s by 4-row blocks, 1 thread, Xeon)
LOGPROB_BLOCK_BYTES = 1 << 20


def token_logprobs(gm, logits, targets, block_bytes=LOGPROB_BLOCK_BYTES):
    """log softmax(logits)[target] per position: logits (B, T, V) on gm's device, targets (B, T) host
    ints (-1: padding, gives 0). Returns a host float64 array (B, T).
    subtle: the max is subtracted before exp, as in every softmax here; float32 logits stay float32. On
    NumPy the rows go through exp in blocks of block_bytes (one block's buffer the only temporary); each
    row's sum is the same reduction either way, so the result does not depend on the block size."""
    xp = gm.xp
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)                                              # (B*T, V), a view
    m = flat.max(axis=-1)                                                     # (B*T,)
    rows = max(1, block_bytes // (V * flat.itemsize)) if xp is np else flat.shape[0]   # a GPU: one block
    e = xp.empty((min(rows, flat.shape[0]), V), dtype=flat.dtype)
    s = xp.empty_like(m)                                                      # sum exp(logits - m) per row
    for i in range(0, flat.shape[0], rows):
        blk = e[:min(rows, flat.shape[0] - i)]
        xp.subtract(flat[i:i + rows], m[i:i + rows, None], out=blk)
        xp.exp(blk, out=blk)
        blk.sum(axis=-1, out=s[i:i + rows])
    lse = (m + xp.log(s)).reshape(logits.shape[:-1])                          # log sum exp, (B, T)
    t = xp.asarray(np.maximum(targets, 0))
    picked = xp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]        # logits[b, t, target], (B, T)
    lp = gm.to_host(picked - lse).astype(np.float64)
    return np.where(targets >= 0, lp, 0.0)


# How much scoring puts through the model at once: tokens of a batch of windows (score_windows), or
# positions in a batch of choices' KV caches (score_requests), and bytes of float32 logits of a piece of
# positions or of a batch of choices
BATCH_TOKENS = 1 << 12
BATCH_BYTES = 1 << 28


def score_continuations(gm, params, cfg, ctxs, conts):
    """Summed log p(cont | ctx) of each continuation of several contexts of one length, in one batch.
    ctxs: G contexts, each of the same length c; conts: for each context, its continuations. Returns (the
    log-likelihoods of all the continuations in order, context by context; their per-token
    log-probabilities, one row each).

    Each context is read once: all of it but its last token goes through forward_cached into a KV cache
    (the G contexts as G rows: one length, so no padding and one position for all), whose keys and values
    are then copied for each of its continuations; the batch row of a continuation is
    [ctx[-1]] + cont[:-1], right-padded (causal: padding at the end changes no earlier position), and
    its logits predict cont."""
    c = len(ctxs[0])
    T = max(len(x) for cs in conts for x in cs)                   # ctx[-1] + the longest cont minus its last
    ccfg = replace(cfg, max_seq_len=c - 1 + T)                    # a cache just as long as needed
    dtype = params["tok_emb"].dtype
    kv = gm.kv_cache_init(ccfg, dtype, batch=len(ctxs))
    if c > 1:                                                     # prefill (logits unused)
        gm.forward_cached(params, np.asarray([ctx[:-1] for ctx in ctxs]), ccfg, kv, 0, last_only=True)
    of = gm.xp.asarray(np.repeat(np.arange(len(ctxs)), [len(cs) for cs in conts]))   # each row's context
    kv = [(K[of], V[of]) for K, V in kv]                          # the contexts, a copy per continuation
    B = len(of)
    ids = np.zeros((B, T), dtype=np.int64)                       # padding: id 0, never scored
    targets = np.full((B, T), -1, dtype=np.int64)
    rows = [(ctx[-1], x) for ctx, cs in zip(ctxs, conts) for x in cs]
    for b, (last, x) in enumerate(rows):
        row = [last] + x[:-1]
        ids[b, :len(row)] = row
        targets[b, :len(x)] = x
    logits = gm.forward_cached(params, ids, ccfg, kv, c - 1)     # (B, T, V)
    lp = token_logprobs(gm, logits, targets)                      # (B, T)
    return lp.sum(axis=1), lp


@dataclass
class MCResult:
    index: int                  # the item's position among those scored
    line: int
    label: int
    loglikelihoods: list        # per choice, summed over its tokens (nats)
    tokens: list                # per choice: tokens scored
    chars: list                 # per choice: len(choice) in characters
    truncated: bool
    pred: int = field(init=False)
    pred_norm: int = field(init=False)
    pred_token_norm: int = field(init=False)

    def __post_init__(self):
        ll = np.asarray(self.loglikelihoods, dtype=np.float64)
        self.pred = int(np.argmax(ll))                                        # ties: the first
        self.pred_norm = int(np.argmax(ll / np.asarray(self.chars, np.float64)))
        self.pred_token_norm = int(np.argmax(ll / np.asarray(self.tokens, np.float64)))

    def record(self):
        """The --per-item JSON line."""
        return {"index": self.index, "line": self.line, "label": self.label, "pred": self.pred,
                "pred_norm": self.pred_norm, "pred_token_norm": self.pred_token_norm,
                "loglikelihoods": self.loglikelihoods, "tokens": self.tokens, "chars": self.chars,
                "truncated": self.truncated}


def score_request(gm, params, cfg, req, index=0):
    """One item: its choices that share a context are scored in one batch (after a left-truncation the
    contexts may differ: each group of equal contexts is a batch)."""
    ll = [0.0] * len(req.inputs)
    groups = {}
    for i, (ctx, _) in enumerate(req.inputs):
        groups.setdefault(tuple(ctx), []).append(i)
    for ctx, members in groups.items():
        sums, _ = score_continuations(gm, params, cfg, [list(ctx)], [[req.inputs[i][1] for i in members]])
        for i, s in zip(members, sums):
            ll[i] = float(s)
    return result_of(req, ll, index)


def result_of(req, ll, index):
    return MCResult(index, req.item.line, req.item.label, ll, [len(cont) for _, cont in req.inputs],
                    [len(c) for c in req.item.choices], req.truncated)


def score_requests(gm, params, cfg, reqs, progress=False, desc="scoring", batch_bytes=BATCH_BYTES,
                   batch_tokens=BATCH_TOKENS):
    """MCResults of every request, in order; a tqdm bar (items/s) when progress is true.

    Items whose choices share one context go through the model together with the next such items whose
    context has the same length in tokens (score_continuations: one prefill for their contexts, one batch
    for all their choices), up to batch_tokens positions in the choices' KV caches (a row per choice) and
    batch_bytes of their float32 logits at a time: one item's products have few rows (~50 for HellaSwag),
    which a BLAS multiplies well below its peak.
    An item's log-likelihoods depend on its batch only through float rounding (the same sums, which the
    BLAS may block otherwise: ~1e-7 relative). The others (left-truncated items whose choices see
    different contexts) go one by one (score_request)."""
    from tqdm import tqdm
    shared = lambda req: len({tuple(ctx) for ctx, _ in req.inputs}) == 1     # noqa: E731  one context
    batches, filling = [], {}                       # filling: context length -> (its batch, rows, longest)
    for k, req in enumerate(reqs):
        if not shared(req):
            batches.append([k])                     # contexts that differ between choices: alone
            continue
        c, lens = len(req.inputs[0][0]), [len(cont) for _, cont in req.inputs]
        batch, rows, longest = filling.get(c, (None, 0, 0))
        rows, longest = rows + len(lens), max(longest, *lens)
        kv_positions, logit_bytes = rows * (c - 1 + longest), rows * longest * cfg.vocab_size * 4
        if batch is None or kv_positions > batch_tokens or logit_bytes > batch_bytes:
            batch, rows, longest = [], len(lens), max(lens)                  # a new batch for this length
            batches.append(batch)
        batch.append(k)
        filling[c] = (batch, rows, longest)
    out = [None] * len(reqs)
    with tqdm(total=len(reqs), unit=" items", desc=desc, dynamic_ncols=True, disable=not progress or None) as bar:
        for batch in batches:
            inputs = [reqs[k].inputs for k in batch]
            if not shared(reqs[batch[0]]):
                out[batch[0]] = score_request(gm, params, cfg, reqs[batch[0]], batch[0])
            else:
                sums, _ = score_continuations(gm, params, cfg, [x[0][0] for x in inputs],
                                              [[cont for _, cont in x] for x in inputs])
                at = 0
                for k, x in zip(batch, inputs):
                    out[k] = result_of(reqs[k], [float(v) for v in sums[at:at + len(x)]], k)
                    at += len(x)
            bar.update(len(batch))
    return out


def mean_stderr(x):
    """The harness's standard error of a mean: sample standard deviation (n - 1) / sqrt(n); None for n < 2.
    For 0/1 scores with mean p: sqrt(p (1 - p) / (n - 1))."""
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2:
        return None
    return float(x.std(ddof=1) / math.sqrt(x.size))


def mc_metrics(results):
    """acc, acc_norm, acc_token_norm and their standard errors over MCResults, plus items and truncated."""
    out = {}
    for name, attr in (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_token_norm", "pred_token_norm")):
        hits = [float(getattr(r, attr) == r.label) for r in results]
        out[name] = float(np.mean(hits))
        out[name + "_stderr"] = mean_stderr(hits)
    out["items"] = len(results)
    out["truncated"] = sum(r.truncated for r in results)
    return out


# ----------------------------------------------------------------------------------------------------
# Text perplexity

def text_windows(n_tokens, block_size, stride=None):
    """The windows over n_tokens ids as (start, end, first): the model reads ids[start:end] and is scored
    on the targets ids[first:end + 1] (positions first .. end), every position 1 .. n_tokens - 1 once.

    >>> text_windows(9, 4)                  # overlap of one token: [0..4], [4..8]
    [(0, 4, 1), (4, 8, 5)]
    >>> text_windows(9, 4, stride=2)        # sliding: each later window scores its last 2 targets
    [(0, 4, 1), (2, 6, 5), (4, 8, 7)]
    """
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size = {block_size}], got {stride}")
    windows, start, done = [], 0, 0                     # done: the last position scored so far
    while done < n_tokens - 1:
        end = min(start + block_size, n_tokens - 1)     # reads ids[start:end], predicts ids[start+1:end+1]
        windows.append((start, end, done + 1))
        done, start = end, start + stride
    return windows


def rolling_windows(n_tokens, block_size):
    """lm-evaluation-harness's loglikelihood_rolling windows (lm_eval/utils.py get_rolling_token_windows with
    context_len=1, then make_disjoint_window) over one document read as [prefix] + its tokens, n_tokens ids
    in all, in text_windows' form (start, end, first): every token of the document is scored once, the
    first one after the prefix (the model's BOS). Windows of N predictions, each after the first reading
    the one token before its first prediction as context, and the last, shorter one right-aligned: it reads
    the N tokens before its end, so its k predictions keep up to N - k tokens of context.

    >>> rolling_windows(10, 4)              # prefix + 9 tokens: [0..4], [4..8], then [5..9] scoring 9 only
    [(0, 4, 1), (4, 8, 5), (5, 9, 9)]
    >>> rolling_windows(1, 4)               # an empty document: nothing to score
    []
    """
    windows = text_windows(n_tokens, block_size) if n_tokens > 1 else []
    if windows:
        _, end, first = windows[-1]
        windows[-1] = (max(0, end - block_size), end, first)        # right-aligned
    return windows


def score_windows(gm, params, cfg, seqs, windows, progress=False, batch_bytes=BATCH_BYTES, batch_tokens=BATCH_TOKENS):
    """The summed log-probability of each window's targets. seqs: 1-D int arrays; windows: (seq, start,
    end, first): the model reads seqs[seq][start:end] and is scored on the targets seqs[seq][first:end + 1].
    Returns a float64 array, one sum per window.

    Windows go through the model together, longest first, each batch right-padded to its longest window
    (causal attention: padding after a position changes nothing there), up to batch_tokens tokens at a
    time, and each batch in pieces of positions: a piece goes through forward_cached on top of the KV cache
    of the pieces before it (the inference forward, which keeps nothing), its logits at most batch_bytes of
    float32 (a window of 8192 positions has 1.6 GB of logits over SmolLM2's 49152 ids); a piece with no
    target asks for its last position's logits alone."""
    from tqdm import tqdm
    order = sorted(range(len(windows)), key=lambda k: -(windows[k][2] - windows[k][1]))     # longest first
    sums = np.zeros(len(windows))
    dtype = next(iter(params.values())).dtype
    with tqdm(total=len(windows), unit=" windows", desc="scoring", dynamic_ncols=True,
              disable=not progress or None) as bar:
        k = 0
        while k < len(order):
            T = windows[order[k]][2] - windows[order[k]][1]                        # the batch's longest
            group = order[k:k + max(1, min(batch_tokens // T, batch_bytes // (cfg.vocab_size * 4)))]
            x = np.zeros((len(group), T), dtype=np.int64)                         # padding: id 0, never scored
            y = np.full((len(group), T), -1, dtype=np.int64)                      # -1: not scored
            for b, w in enumerate(group):
                seq, start, end, first = windows[w]
                ids = seqs[seq]
                x[b, :end - start] = ids[start:end]
                y[b, first - start - 1:end - start] = ids[first:end + 1]          # targets first .. end
            kv = gm.kv_cache_init(cfg, dtype, batch=len(group), length=T)
            piece = max(1, batch_bytes // (len(group) * cfg.vocab_size * 4))
            for p0 in range(0, T, piece):
                p1 = min(T, p0 + piece)
                scored = (y[:, p0:p1] >= 0).any()
                logits = gm.forward_cached(params, x[:, p0:p1], cfg, kv, p0, last_only=not scored)
                if scored:
                    sums[group] += token_logprobs(gm, logits, y[:, p0:p1]).sum(axis=1)
            k += len(group)
            bar.update(len(group))
    return sums


def score_text(gm, params, cfg, ids, block_size=None, stride=None, token_bytes=None, progress=False,
               batch_bytes=BATCH_BYTES, batch_tokens=BATCH_TOKENS):
    """The "strided" procedure: mean loss of every token but the first of one token stream, in the windows
    of text_windows. ids: a 1-D int array. token_bytes (the UTF-8 length of each id,
    tokenizer.token_byte_lengths) adds bits per byte over the scored tokens' bytes. Returns {"procedure",
    "loss", "ppl", "bits_per_byte", "tokens", "bytes", "windows", "block_size", "stride"}."""
    ids = np.asarray(ids, dtype=np.int64)
    N = block_size or cfg.max_seq_len
    if N > cfg.max_seq_len:
        raise UserError(f"block size {N} exceeds the model's context of {cfg.max_seq_len} tokens")
    if ids.size < 2:
        raise UserError(f"the text has {ids.size} token(s); at least 2 are needed to predict one")
    windows = [(0, *w) for w in text_windows(ids.size, N, stride)]
    nll = -float(score_windows(gm, params, cfg, [ids], windows, progress, batch_bytes, batch_tokens).sum())
    count = ids.size - 1
    nbytes = int(token_bytes[ids[1:]].sum()) if token_bytes is not None else None
    loss = nll / count
    return {"procedure": "strided", "loss": loss, "ppl": math.exp(loss),
            "bits_per_byte": nll / math.log(2) / nbytes if nbytes else None,
            "tokens": count, "bytes": nbytes, "windows": len(windows), "block_size": N, "stride": stride or N}


def count_words(doc):
    """Words as the harness counts them for word_perplexity: re.split(r"\\s+", doc), so a document that
    ends with a newline counts one more (an empty string) and an empty document counts 1."""
    return len(re.split(r"\s+", doc))


def score_rolling(gm, params, cfg, docs, prefix, block_size=None, progress=False, batch_bytes=BATCH_BYTES,
                  batch_tokens=BATCH_TOKENS):
    """The "rolling" procedure, lm-evaluation-harness's loglikelihood_rolling with its wikitext metrics:
    each document (text, ids) is read as [prefix] + ids in rolling_windows, so every one of its tokens is
    scored; its log-likelihood is the sum. Over the documents (lm_eval/api/metrics.py):
      word_perplexity = exp(-sum ll / sum words), words = count_words(text)
      byte_perplexity = exp(-sum ll / sum bytes), bytes = len(text.encode("utf-8"))
      bits_per_byte   = -sum ll / sum bytes / ln 2
    plus loss (nats per token) and ppl = exp(loss), the token-level numbers. prefix: the model's BOS
    (start_ids), the harness's prefix_token_id. Returns those and {"procedure", "documents", "tokens",
    "words", "bytes", "windows", "block_size", "loglikelihoods" (per document)}."""
    N = block_size or cfg.max_seq_len
    if N > cfg.max_seq_len:
        raise UserError(f"block size {N} exceeds the model's context of {cfg.max_seq_len} tokens")
    seqs = [np.asarray(list(prefix) + [int(i) for i in ids], dtype=np.int64) for _, ids in docs]
    windows = [(d, *w) for d, seq in enumerate(seqs) for w in rolling_windows(seq.size, N)]
    if not windows:
        raise UserError("the text has no tokens to score")
    sums = score_windows(gm, params, cfg, seqs, windows, progress, batch_bytes, batch_tokens)
    lls = np.zeros(len(docs))
    np.add.at(lls, [w[0] for w in windows], sums)
    ll = float(lls.sum())
    tokens = sum(seq.size - 1 for seq in seqs)
    words = sum(count_words(text) for text, _ in docs)
    nbytes = sum(len(to_bytes(text)) for text, _ in docs)           # a file's own bytes, even invalid UTF-8
    return {"procedure": "rolling", "loss": -ll / tokens, "ppl": math.exp(-ll / tokens),
            "word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes) if nbytes else None,
            "bits_per_byte": -ll / nbytes / math.log(2) if nbytes else None,
            "documents": len(docs), "tokens": tokens, "words": words, "bytes": nbytes, "windows": len(windows),
            "block_size": N, "loglikelihoods": lls.tolist()}
