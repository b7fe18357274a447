"""
lib/generation.py: text from a model, token by token: sampling from the logits (greedy, temperature, top-k,
top-p), the generation loop over the model's KV-cache forward (gpt_numpy.forward_cached), and KVSession,
the cache kept from one call to the next so that a chat feeds the model only what is new each turn.

    ids = generate(gm, params, prompt_ids, cfg, 100, temperature=0.8, top_k=200, seed=1)   # prompt + new ids
    for i in generate_stream(gm, params, prompt_ids, cfg, 100, stop_ids={2}): ...          # one id at a time

gm is the model module, gpt_numpy or gpt_cupy: the array work runs there (forward_cached, kv_cache_init);
the sampling itself is host NumPy on one row of logits.
"""

import math
from dataclasses import dataclass, field

import numpy as np


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Pick a token id from host logits (V,): greedy when temperature == 0, else a sample from
    softmax(logits / temperature) restricted to the top_k ids and the top_p probability mass."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(logits))
    # subtle: shift by the max before dividing. With a tiny temperature (1e-310) logits / t overflows to
    # inf, and inf - inf is nan; shifted, the best logit stays 0 and the others can only go to -inf.
    with np.errstate(over="ignore"):
        logits = (logits - logits.max()) / temperature
    if top_k is not None and 0 < top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        cut = int(np.searchsorted(cum, top_p)) + 1      # smallest prefix whose mass reaches top_p
        mask = np.zeros_like(probs)
        mask[order[:cut]] = 1.0
        probs = probs * mask
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


@dataclass
class KVSession:
    """A KV cache kept from one generate_stream call to the next, with the ids whose keys and values it
    holds (positions 0 .. len(ids) - 1). A chat's next prompt starts with everything said so far, so
    only the tokens after the longest common prefix go through the model again."""
    kv: list = None
    ids: list = field(default_factory=list)


def session_cache(gm, session, ctx, length, cfg, dtype):
    """(kv, n): a cache of at least `length` positions whose first n already hold ctx[:n] (n = 0 without
    a session). n stops one short of the whole prompt: its last token must go through to give logits.
    A cache too short for this call grows (at least doubling), keeping its first n positions."""
    if session is None:
        return gm.kv_cache_init(cfg, dtype, length=length), 0
    n = 0
    for a, b in zip(session.ids, ctx[:-1]):
        if a != b:
            break
        n += 1
    old = session.kv
    if old is None or old[0][0].shape[2] < length:
        grown = max(length, min(cfg.max_seq_len, 2 * old[0][0].shape[2])) if old is not None else length
        session.kv = gm.kv_cache_init(cfg, dtype, length=grown)
        for (K, V), (K0, V0) in zip(session.kv, old or []):
            K[:, :, :n], V[:, :, :n] = K0[:, :, :n], V0[:, :, :n]
    session.ids = list(ctx[:n])
    return session.kv, n


def cache_positions(cfg, prompt_len, max_new_tokens):
    """The positions of the KV cache generate_stream allocates for a prompt of prompt_len ids: the prompt
    (cropped to its last max_seq_len) and the new tokens but the last, which is never fed back, capped at
    max_seq_len; 0 when nothing is generated. A model with a long context (8192, 131072) does not
    allocate all of it for a short answer. (memory.py's estimate reads the same rule.)"""
    if max_new_tokens <= 0:
        return 0
    return min(cfg.max_seq_len, min(prompt_len, cfg.max_seq_len) + max_new_tokens - 1)


def generate_stream(gm, params, ids, cfg, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                    seed=None, stop_ids=(), lora=None, session=None):
    """Yield new token ids one at a time after the prompt `ids` (a 1-D sequence of ints). lora: the
    LoraConfig of adapters in params (unmerged), or None. session: a KVSession to reuse and keep the
    cache in (a chat), or None.

    The context is cropped to its last max_seq_len tokens; once it is full, the cache is rebuilt from
    the cropped context each step (RoPE positions restart at 0, as a fresh forward would see them).
    """
    ids = [int(i) for i in np.asarray(gm.to_host(ids) if hasattr(ids, "shape") else ids).ravel()]
    if not ids:
        raise ValueError("generate needs a prompt of at least one token id")
    gm.check_ids(np.asarray([ids[-cfg.max_seq_len:]]), cfg, "prompt")
    if not 0 <= temperature < math.inf:                                 # also refuses nan
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    rng = np.random.default_rng(seed)
    stop = set(int(s) for s in (stop_ids or ()))
    if max_new_tokens <= 0:
        return
    ctx = ids[-cfg.max_seq_len:]
    # the cache holds the prompt and the new tokens (the last one is never fed back), capped at the context;
    # with a session, its first `done` positions may hold the prompt's beginning already
    length = cache_positions(cfg, len(ctx), max_new_tokens)
    kv, done = session_cache(gm, session, ctx, length, cfg, params["tok_emb"].dtype)
    logits = gm.forward_cached(params, np.asarray([ctx[done:]]), cfg, kv, done, last_only=True, lora=lora)  # prefill
    pos = len(ctx)
    held = session.ids if session is not None else []                   # the ids the cache holds, kept current
    held.extend(ctx[done:])
    for n in range(max_new_tokens):
        nxt = sample_next(gm.to_host(logits[0, -1]), rng, temperature, top_k, top_p)
        yield nxt
        if nxt in stop or n == max_new_tokens - 1:                      # done: no forward for a token unused
            return
        ctx.append(nxt)
        if pos < kv[0][0].shape[2]:                                     # room left: one new position
            logits = gm.forward_cached(params, np.asarray([[nxt]]), cfg, kv, pos, lora=lora)
            pos += 1
            held.append(nxt)
        else:                                                           # full: crop and re-prefill
            ctx = ctx[-cfg.max_seq_len:]
            logits = gm.forward_cached(params, np.asarray([ctx]), cfg, kv, 0, last_only=True, lora=lora)
            held[:] = ctx


def generate(gm, params, ids, cfg, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
             stop_ids=(), lora=None, session=None):
    """The prompt followed by up to max_new_tokens sampled ids, as a list of ints (stops early after a
    stop id). temperature=0 is greedy decoding; a seed makes sampling reproducible."""
    prompt = [int(i) for i in np.asarray(gm.to_host(ids) if hasattr(ids, "shape") else ids).ravel()]
    return prompt + list(generate_stream(gm, params, prompt, cfg, max_new_tokens, temperature, top_k, top_p,
                                         seed, stop_ids, lora, session))
