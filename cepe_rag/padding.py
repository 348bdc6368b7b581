"""Token id lists -> one padded batch: the single place every batch (decoder prompts, encoder chunks,
training examples) is padded."""

from __future__ import annotations

import torch


def pad_id_of(tokenizer) -> int:
    """The tokenizer's padding id; decoders without one pad with end-of-sequence (masked out anyway)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def pad_token_ids(sequences: list[list[int]], pad_id: int, *, side: str = "right",
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (len(sequences), longest); `left` keeps every row's last token in the
    last column (batched generation), `right` every row's first token in the first (encoders, training)."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            columns = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
            ids[row, columns] = torch.tensor(sequence, dtype=torch.long)
            mask[row, columns] = 1
    return ids.to(device), mask.to(device)
