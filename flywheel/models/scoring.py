"""Log-probabilities of candidate continuations under a local model: constrained judging.

A judge that must answer with one of a few strings (a label, a number in a range) need not
generate at all: the model's own probability of each candidate, written after the chat
template's generation prompt, says which one it prefers, and it always answers.

    model = load_model("local:smollm2")
    model.score_choices([[{"role": "user", "content": "Is 'great film' positive?"}]],
                        ['{"result": "yes"}', '{"result": "no"}'])
    # -> [[-0.41, -1.09]]  (summed log-probabilities of each candidate's tokens)

Batched: the prompts of a batch are left-padded and run once; their KV cache is repeated once per
candidate and the candidates (right-padded) run on top of it, so a prompt is computed once however
many candidates it has; a prefix all prompts share (the system prompt and the grader's
instruction) runs once per batch. Position ids come from the attention mask, so a padded row
computes exactly what it would alone.
"""

from __future__ import annotations

from typing import Any

from flywheel.models.kv_cache import cache_kwarg, output_cache

#: Rows (prompt x candidate) per forward pass: bounds the memory of the repeated KV cache.
MAX_ROWS = 128
#: Below this many shared tokens, copying a prefix cache costs more than recomputing it.
MIN_PREFIX_TOKENS = 8


def score_choices(model: Any, conversations: list[list[dict[str, str]]], choices: list[str],
                  *, max_rows: int = MAX_ROWS) -> list[list[float]]:
    """Summed log-probability of each choice as the assistant's reply, per conversation.

    `model` is a flywheel LocalModel (its `load()` gives the transformers model and tokenizer).
    Returns one list per conversation, aligned with `choices`.
    """
    if not choices:
        raise ValueError("score_choices needs at least one choice")
    if not conversations:
        return []
    hf_model, tokenizer = model.load()
    prompts = [tokenizer(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False).input_ids for c in conversations]
    continuations = [tokenizer(choice, add_special_tokens=False).input_ids for choice in choices]
    if any(not ids for ids in continuations):
        raise ValueError("a choice encodes to no tokens: " + repr(choices[[len(i) for i in continuations].index(0)]))
    # Tokens all candidates start with (`{"result": `) are scored once, as part of the prompt.
    common = 0
    while common < min(len(c) for c in continuations) - 1 and all(
            c[common] == continuations[0][common] for c in continuations):
        common += 1
    shared, continuations = continuations[0][:common], [c[common:] for c in continuations]
    per_batch = max(1, max_rows // len(choices))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    out: list[list[float] | None] = [None] * len(prompts)
    for start in range(0, len(order), per_batch):
        chunk = order[start:start + per_batch]
        scores = _score_batch(hf_model, tokenizer, [prompts[i] for i in chunk], continuations, shared)
        for index, row in zip(chunk, scores):
            out[index] = row
    return out  # type: ignore[return-value]


def _shared_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with (the system prompt, usually), leaving each one own token."""
    shortest = min(len(p) for p in prompts)
    length, first = 0, prompts[0]
    while length < shortest - 1 and all(p[length] == first[length] for p in prompts):
        length += 1
    return length if length >= MIN_PREFIX_TOKENS else 0


def _score_batch(hf_model: Any, tokenizer: Any, prompts: list[list[int]],
                 continuations: list[list[int]], shared: list[int]) -> list[list[float]]:
    """Log-probs of `shared + c` after each prompt, for each continuation c."""
    import torch

    prompts = [p + shared for p in prompts]

    device = hf_model.device
    cache_kw = cache_kwarg(hf_model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n, k = len(prompts), len(continuations)
    # Layout per row: [shared prefix][left padding][own prompt tokens]; the prefix runs once.
    prefix = _shared_prefix(prompts) if n > 1 else 0
    own = [p[prefix:] for p in prompts]
    width = max(len(o) for o in own)
    ids = torch.tensor([[pad] * (width - len(o)) + o for o in own], device=device)
    mask = torch.tensor([[1] * prefix + [0] * (width - len(o)) + [1] * len(o) for o in own], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix:]
    with torch.inference_mode():
        extra: dict[str, Any] = {}
        if prefix:
            pre = hf_model(input_ids=torch.tensor([prompts[0][:prefix]], device=device), use_cache=True,
                           **_keep(hf_model, 1))
            cache = output_cache(pre)
            cache.batch_repeat_interleave(n)
            extra[cache_kw] = cache
        # the LM head only where log-probs are read: it costs as much as the model on long prompts
        first = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **_keep(hf_model, len(shared) + 1), **extra)
        # log-probs of the shared tokens and of every candidate's first token: the prompts' last positions
        tail = torch.log_softmax(first.logits[:, -len(shared) - 1:, :].float(), dim=-1)  # [n, shared+1, vocab]
        head = tail[:, -1, :]
        shared_logp = [sum(float(tail[r, t, token]) for t, token in enumerate(shared)) for r in range(n)]
        cache = output_cache(first)
        cache.batch_repeat_interleave(k)  # row r*k + j: prompt r, candidate j
        length = max(len(c) for c in continuations)
        cont = torch.tensor([c + [pad] * (length - len(c)) for c in continuations], device=device)
        cont_ids = cont.repeat(n, 1)  # [n*k, length]
        # Candidate padding sits after the real tokens: causal attention keeps it out of them.
        cont_mask = torch.cat([mask.repeat_interleave(k, dim=0),
                               torch.ones(n * k, length, dtype=mask.dtype, device=device)], dim=1)
        lengths = mask.sum(-1).repeat_interleave(k)  # real prompt length per row
        cont_positions = lengths[:, None] + torch.arange(length, device=device)[None, :]
        rest = hf_model(input_ids=cont_ids, attention_mask=cont_mask, position_ids=cont_positions,
                        use_cache=False, **{cache_kw: cache})
        targets = torch.tensor([c[1:] + [0] * (length - len(c) + 1) for c in continuations], device=device)
        # only the log-probs of the candidates' own next tokens are read: gather, not a full softmax copy
        logits = rest.logits.float()
        picked = logits.gather(-1, targets.repeat(n, 1)[:, :, None])[:, :, 0] - torch.logsumexp(logits, dim=-1)
    results = []
    for r in range(n):
        row = []
        for j, tokens in enumerate(continuations):
            total = shared_logp[r] + float(head[r, tokens[0]])
            total += float(picked[r * k + j, : len(tokens) - 1].sum())
            row.append(total)
        results.append(row)
    return results


def _keep(hf_model: Any, last: int) -> dict[str, int]:
    """`logits_to_keep=last` where the model takes it (all positions' logits otherwise)."""
    import inspect

    try:
        accepted = "logits_to_keep" in inspect.signature(hf_model.forward).parameters
    except (TypeError, ValueError):
        accepted = False
    return {"logits_to_keep": last} if accepted else {}

