"""Several continuations of one prompt in one row: the prompt once, then each continuation as its own block.

A block sees the whole prompt and itself, never another block, and its position ids go on from the
prompt's end, so each block's hidden states are those of prompt + that continuation read on its own.
Evaluation scores a question's five choices this way (the prompt is not re-read per choice), and the cloze
KL arm trains on every choice's continuation this way. `pack_choices` lays a row out; `data.collate` turns
rows with blocks into a 4D attention mask and position ids (`block_attention`); `body_hidden` runs a
causal LM's body on such a batch (a plain 2D-mask batch as well), for every model this package runs.

The 4D mask is handed to the model as it is: transformers uses a 4D mask unchanged in its sdpa and eager
attention (bool for sdpa, additive float for eager), for Llama, OLMo2 and Gemma3 alike. Gemma3's sliding
layers get their own mask, the same one restricted to |position distance| < sliding_window, which is
what transformers builds for one unpacked sequence.
"""
from __future__ import annotations

import torch

from .errors import CheckpointError, DataError


def prompt_cut(ctx: list[int], cont: list[int], max_length: int) -> int:
    """How many prompt ids lm-eval drops from the left for this continuation: its input is
    (ctx + cont)[-(max_length + 1):][:-1]."""
    return max(0, len(ctx) + len(cont) - 1 - max_length)


def pack_choices(ctx: list[int], conts: list[list[int]], max_length: int, where: str = "") -> dict:
    """One row: the prompt, cut from the left as lm-eval cuts it for the longest continuation, then each
    continuation minus its last id as a block. `predicts[j]` lists the positions whose next-token
    distribution predicts continuation j's ids in order: the prompt's last position (shared by every
    block), then block j's own positions. `positions` is every position that predicts some continuation
    id: the prompt's last and every block position (what evaluation scores and the cloze KL arm supervises)."""
    cut = max(prompt_cut(ctx, c, max_length) for c in conts)
    if cut >= len(ctx):
        raise DataError(f"{where or 'a question'}: a continuation of {max(map(len, conts))} tokens leaves no room for "
                        f"the prompt in data.max_length = {max_length}")
    prompt = ctx[cut:]
    ids, blocks, predicts = list(prompt), [], []
    for cont in conts:
        predicts.append([len(prompt) - 1] + list(range(len(ids), len(ids) + len(cont) - 1)))
        ids += cont[:-1]
        blocks.append(len(cont) - 1)
    return {"input_ids": ids, "blocks": blocks, "predicts": predicts,
            "positions": list(range(len(prompt) - 1, len(ids)))}


def block_attention(rows: list[dict], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 1, width, width] bool mask (True: may attend) and [B, width] position ids of right-padded rows,
    each the prompt followed by its `blocks` (lengths; a row without blocks is one causal sequence).
    A padding position attends to itself only, so no softmax row is empty (an empty one is NaN, and a
    NaN value times a zero weight is NaN too)."""
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 padding, 0 prompt, j + 1 block j
    position = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        blocks = r.get("blocks", [])
        prompt = len(r["input_ids"]) - sum(blocks)
        segment[b, :prompt], position[b, :prompt] = 0, torch.arange(prompt)
        start = prompt
        for j, n in enumerate(blocks):
            segment[b, start: start + n], position[b, start: start + n] = j + 1, torch.arange(prompt, prompt + n)
            start += n
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & (q >= 0) & ((k == 0) | (k == q))
    mask |= torch.eye(width, dtype=torch.bool) & (q < 0)
    return mask[:, None], position


def _attention_masks(lm, mask: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """The 4D bool mask in the form `lm`'s attention takes it: bool for sdpa, additive for eager; a
    {layer type: mask} dict where some layers slide (Gemma3)."""
    cfg = lm.config
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        raise CheckpointError(f"packed rows (a question's choices after its prompt) need sdpa or eager attention; "
                              f"the model runs {impl}")

    def form(m: torch.Tensor) -> torch.Tensor:
        if impl == "sdpa":
            return m
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, torch.finfo(dtype).min)

    layer_types = set(getattr(cfg, "layer_types", None) or ())
    if "sliding_attention" not in layer_types:
        return form(mask)
    distance = position_ids[:, None, :, None] - position_ids[:, None, None, :]
    sliding = mask & (distance < cfg.sliding_window)
    return {"full_attention": form(mask), "sliding_attention": form(sliding)}


def body_hidden(lm, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """The last hidden states of a causal LM's body (no head, no cache) on a `data.collate` batch: a 2D
    padding mask, or a packed batch's 4D mask with its position ids."""
    if attention_mask.ndim == 4:
        dtype = lm.get_input_embeddings().weight.dtype
        attention_mask = _attention_masks(lm, attention_mask, position_ids, dtype)
    return lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False).last_hidden_state
