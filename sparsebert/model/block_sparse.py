"""Block-sparse attention by gathering: each query block attends only the key blocks its mask touches.

The sequence is cut into blocks of ``b`` positions. For every query block, the key blocks that hold any
allowed position are gathered (``index_select``) into one short key sequence, and SDPA runs on the query
blocks as a batch of ``b × (k·b)`` problems (in chunks of bounded size), with the mask restricted to the
gathered blocks. So the work is ``k/n`` of dense attention instead of all of it, forward *and* backward
(plain autograd through ``index_select`` and SDPA), on any device and without compilation: this is what
makes a sparse pattern train faster on CPU, where FlexAttention has no backward.

A query block whose row reaches nearly every key block (a global token's) would force every block to
gather that many: such *heavy* blocks attend the whole sequence instead, through one masked SDPA call.
Which blocks are heavy, and the block size, are chosen to minimise the work (:func:`plan`); ``work`` is
the fraction of dense attention's score computations that remains, so ``1 / work`` is the ideal speed-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparsebert.model.masks import padded_blocks

# Candidate block sizes; the plan with the least work wins (a tie goes to the larger block, which runs SDPA
# more efficiently per score). On CPU, 16 beat 32 and 64 for longformer at L = 512, 2048 and 4096, forward
# and forward + backward (BERT-mini layer, 4096 tokens).
BLOCK_SIZES = (16, 32, 64, 128)
# The gathered keys (and values) are built and attended in chunks of query blocks of about this many bytes:
# temporaries stay bounded whatever the length, and fresh multi-10-MB buffers, which the allocator maps and
# unmaps on every call (page faults), are avoided — 30 ms instead of 3 for one 38 MB gather here.
GATHER_CHUNK_BYTES = 8 * 2**20


@dataclass
class BlockPlan:
    """Which key blocks each query block gathers, for one (head-shared or per-head) mask ``[Hm, L, L]``.

    ``key_blocks[i]``: the ``kmax`` key blocks query block ``i`` gathers (those any head needs, padded with
    unused blocks); ``light_mask``: the allowed positions within them, ``[n, Hm, b, kmax·b]``; ``heavy``: the
    query blocks that attend every key instead, with ``heavy_mask`` ``[Hm, n_heavy·b, n·b]``. Heavy blocks
    also run through the gathered path (on placeholder blocks) and are overwritten: every query block then
    takes part in the batched SDPA calls without gathering the queries.
    """

    block: int
    seq_len: int
    num_blocks: int
    key_blocks: torch.Tensor
    light_mask: torch.Tensor
    heavy: torch.Tensor
    heavy_mask: torch.Tensor
    work: float
    _rows: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def kmax(self) -> int:
        return self.key_blocks.shape[-1]

    @property
    def padded_len(self) -> int:
        return self.num_blocks * self.block

    def key_rows(self, batch: int) -> torch.Tensor:
        """``[B·n, kmax]``: the rows of a ``[B·n, b·H·D]`` key view each (batch, query block) gathers."""
        if batch not in self._rows:
            offsets = torch.arange(batch, device=self.key_blocks.device) * self.num_blocks
            self._rows[batch] = (offsets[:, None, None] + self.key_blocks).flatten(0, 1)
        return self._rows[batch]

    def masks(
        self,
        batch: int,
        padding: torch.Tensor | None,
        dtype: torch.dtype,
        documents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, ...]:
        """(light bias ``[B·n, Hm, b, kmax·b]``, its empty rows, heavy bias ``[B|1, Hm, n_heavy·b, n·b]``,
        its empty rows) for SDPA: additive float masks, converted once here rather than by SDPA per call.

        ``padding`` is the batch's ``[B, 1, 1, L]`` key-padding mask (None: no padding); ``documents`` its
        ``[B, L]`` document ids (None: none), compared per gathered block. A row with no allowed key is opened to
        every gathered key (SDPA would give NaN) and its output zeroed after.
        """
        light = self.light_mask.unsqueeze(0)  # [1, n, Hm, b, kb]
        heavy = self.heavy_mask.unsqueeze(0)  # [1, Hm, nh·b, n·b]
        if padding is not None:
            keep = F.pad(padding.reshape(batch, -1), (0, self.padded_len - self.seq_len))
            gathered = keep.view(batch, self.num_blocks, self.block)[:, self.key_blocks]  # [B, n, kmax, b]
            light = light & gathered.flatten(-2)[:, :, None, None, :]
            heavy = heavy & keep[:, None, None, :]
        if documents is not None:
            light, heavy = self._within_documents(light, heavy, documents)
        light = light.expand(batch, *light.shape[1:]).flatten(0, 1)
        light, light_empty = _open_empty_rows(light)
        heavy, heavy_empty = _open_empty_rows(heavy)
        return _bias(light, dtype), light_empty, _bias(heavy, dtype), heavy_empty

    def _within_documents(
        self, light: torch.Tensor, heavy: torch.Tensor, documents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``light`` ``[B|1, n, Hm, b, kb]`` and ``heavy`` ``[B|1, Hm, nh·b, n·b]`` restricted to query-key pairs of
        one document (padded positions get id −1: never a real token's)."""
        batch = documents.shape[0]
        docs = F.pad(documents, (0, self.padded_len - self.seq_len), value=-1).view(
            batch, self.num_blocks, -1
        )
        keys = docs[:, self.key_blocks].flatten(-2)  # [B, n, kmax·b]
        light = light & (docs[:, :, :, None] == keys[:, :, None, :])[:, :, None]
        rows = docs[:, self.heavy].flatten(1)  # [B, nh·b]
        heavy = heavy & (rows[:, :, None] == docs.flatten(1)[:, None, :])[:, None]
        return light, heavy


def _open_empty_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    empty = ~mask.any(dim=-1, keepdim=True)
    if not bool(empty.any()):
        return mask, None
    return mask | empty, empty


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


def plan(hard: torch.Tensor, block_sizes: tuple[int, ...] = BLOCK_SIZES) -> BlockPlan:
    """The plan with the least work over ``block_sizes`` for a bool mask ``[Hm, L, L]``."""
    works = {block: _split(_blocks(hard, block)[1], hard.shape[-1], block)[2] for block in block_sizes}
    return plan_for_block(hard, min(block_sizes, key=lambda block: (works[block], -block)))


def _blocks(hard: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mask padded with False to whole blocks ``[Hm, n·b, n·b]``, the key blocks each query block needs
    in any head ``[n, n]``)."""
    blocks = padded_blocks(hard, block)
    heads, n = blocks.shape[:2]
    return blocks.reshape(heads, n * block, n * block), blocks.any(dim=4).any(dim=2).any(dim=0)


def _split(layout: torch.Tensor, seq_len: int, block: int) -> tuple[int, torch.Tensor, float]:
    """(kmax, which query blocks are light, work): light blocks gather kmax key blocks each, heavy ones attend
    all n; kmax is the one that costs least."""
    n = layout.shape[0]
    counts = layout.sum(dim=-1)
    kmax = min(
        (int((counts <= k).sum()) * k + int((counts > k).sum()) * n, k) for k in counts.unique().tolist()
    )[1]
    kmax = max(kmax, 1)
    is_light = counts <= kmax
    computed = (int(is_light.sum()) * kmax + int((~is_light).sum()) * n) * block * block
    return kmax, is_light, computed / seq_len**2


def plan_for_block(hard: torch.Tensor, block: int) -> BlockPlan:
    """The plan for one block size: heavy query blocks chosen to minimise the work."""
    heads, seq_len, _ = hard.shape
    table, layout = _blocks(hard, block)
    n = layout.shape[0]
    blocks = table.view(heads, n, block, n, block)
    kmax, is_light, work = _split(layout, seq_len, block)
    heavy = (~is_light).nonzero().flatten()

    needed = layout & is_light[:, None]  # a heavy block gathers placeholders: its output is replaced
    key_blocks = torch.argsort(needed.to(torch.int8), dim=-1, descending=True, stable=True)[:, :kmax]
    used = torch.gather(needed, -1, key_blocks)  # False where a slot only pads to kmax
    index = key_blocks[None, :, None, :, None].expand(heads, -1, block, -1, block)
    light_mask = torch.gather(blocks, 3, index) & used[None, :, None, :, None]  # [Hm, n, b, kmax, b]
    light_mask[:, heavy] = True  # placeholders attend everything, so no heavy row counts as empty
    heavy_mask = table.view(heads, n, block, n * block)[:, heavy]

    return BlockPlan(
        block=block,
        seq_len=seq_len,
        num_blocks=n,
        key_blocks=key_blocks.contiguous(),
        light_mask=light_mask.reshape(heads, n, block, kmax * block).transpose(0, 1).contiguous(),
        heavy=heavy,
        heavy_mask=heavy_mask.reshape(heads, len(heavy) * block, n * block),
        work=work,
    )


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: BlockPlan,
    masks: tuple[torch.Tensor | None, ...],
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of ``[B, H, L, D]`` inputs under ``plan`` with ``masks = plan.masks(B, padding, dtype)``.

    Blocks are gathered from the ``[B, L, H, D]`` layout the projections produce (transformers hands the
    inputs over as transposed views of it), so no input is copied before the gather, and the output is
    written in that layout too.
    """
    batch, heads, seq_len, dim = query.shape
    n, b, kmax = plan.num_blocks, plan.block, plan.kmax
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, L, H, D]
    if plan.padded_len != seq_len:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, plan.padded_len - seq_len)) for t in (q, k, v))
    q, k, v = (t.reshape(batch, n, b, heads, dim) for t in (q, k, v))
    light_bias, light_empty, heavy_bias, heavy_empty = masks

    key_rows = plan.key_rows(batch)  # [B·n, kmax]
    flat_k, flat_v = (t.reshape(batch * n, b * heads * dim) for t in (k, v))
    blocks_q = q.reshape(batch * n, b, heads, dim).transpose(1, 2)  # [B·n, H, b, D]
    step = max(1, GATHER_CHUNK_BYTES // (kmax * b * heads * dim * k.element_size()))
    chunks = []
    for start in range(0, batch * n, step):
        rows = slice(start, start + step)
        index = key_rows[rows].flatten()
        keys, values = (
            t.index_select(0, index).view(-1, kmax * b, heads, dim).transpose(1, 2) for t in (flat_k, flat_v)
        )  # [rows, H, kmax·b, D]
        chunk = F.scaled_dot_product_attention(
            blocks_q[rows], keys, values, attn_mask=light_bias[rows], dropout_p=dropout, scale=scale
        )
        if light_empty is not None:
            chunk = chunk.masked_fill(light_empty[rows], 0.0)
        chunks.append(chunk)
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)  # [B·n, H, b, D]
    out = out.transpose(1, 2).reshape(batch, n, b, heads, dim)
    if len(plan.heavy):
        rows = q.index_select(1, plan.heavy).view(batch, -1, heads, dim).transpose(1, 2)
        keys, values = (t.reshape(batch, n * b, heads, dim).transpose(1, 2) for t in (k, v))
        out_heavy = F.scaled_dot_product_attention(
            rows, keys, values, attn_mask=heavy_bias, dropout_p=dropout, scale=scale
        )  # [B, H, n_heavy·b, D]
        if heavy_empty is not None:
            out_heavy = out_heavy.masked_fill(heavy_empty, 0.0)
        out_heavy = out_heavy.transpose(1, 2).reshape(batch, len(plan.heavy), b, heads, dim)
        out = out.index_copy(1, plan.heavy, out_heavy)
    return out.reshape(batch, n * b, heads, dim)[:, :seq_len].transpose(1, 2)
