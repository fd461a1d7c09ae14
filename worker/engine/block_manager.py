"""Paged KV-cache blocks: who holds which block, and which full blocks can be shared (prefix caching).

Each block holds `block_size` tokens' KV for every layer. A full block whose KV has been computed is
published under a hash of (previous block's hash, its tokens), so a later sequence starting with the
same tokens reuses it instead of recomputing it; reference counts say how many sequences hold a block.
A freed block keeps its hash and stays reusable until a fresh block is needed and it is the least
recently freed (blocks without a hash are handed out first, so cached prefixes live as long as they can).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from worker.engine.sequence import Sequence


def chain_hash(previous_hash: int | None, block_token_ids: tuple[int, ...]) -> int:
    """Identifies a full block by its tokens and everything before it (via the previous block's hash)."""
    return hash((previous_hash, block_token_ids))


@dataclass
class PrefixMatch:
    """Cached blocks holding a waiting sequence's leading tokens, and the chain hash of the last one."""

    block_ids: list[int] = field(default_factory=list)
    last_hash: int | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.reference_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_token_ids: list[tuple[int, ...] | None] = [None] * num_blocks  # guards against collisions
        # Free blocks in the order they should be handed out (an OrderedDict used as an ordered set).
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((block_id, None) for block_id in range(num_blocks))
        self.cached_block_by_hash: dict[int, int] = {}
        self.prefix_cache_queried_blocks = 0
        self.prefix_cache_hit_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, sequence: Sequence) -> PrefixMatch:
        """Cached blocks that hold the sequence's leading tokens. The block holding the last token is never
        matched, so at least one token is always computed (its logits are needed)."""
        matched = PrefixMatch()
        if not self.enable_prefix_caching:
            return matched
        previous_hash = None
        for block_index in range((len(sequence.token_ids) - 1) // self.block_size):
            start = block_index * self.block_size
            block_token_ids = tuple(sequence.token_ids[start : start + self.block_size])
            previous_hash = chain_hash(previous_hash, block_token_ids)
            block_id = self.cached_block_by_hash.get(previous_hash)
            if block_id is None or self.block_token_ids[block_id] != block_token_ids:
                break
            matched.block_ids.append(block_id)
            matched.last_hash = previous_hash
        return matched

    def can_admit(self, match: PrefixMatch, num_tokens: int) -> bool:
        """Whether a sequence reusing the matched blocks can get blocks for its first `num_tokens` tokens."""
        idle_matched = sum(1 for block_id in match.block_ids if self.reference_counts[block_id] == 0)
        fresh_needed = self.blocks_for_tokens(num_tokens) - len(match.block_ids)
        return fresh_needed + idle_matched <= self.num_free_blocks

    def admit(self, sequence: Sequence, match: PrefixMatch, num_tokens: int) -> None:
        """Gives a waiting sequence its cached prefix blocks and fresh blocks up to `num_tokens` tokens."""
        if self.enable_prefix_caching:
            self.prefix_cache_queried_blocks += (len(sequence.token_ids) - 1) // self.block_size
            self.prefix_cache_hit_blocks += len(match.block_ids)
        for block_id in match.block_ids:
            if self.reference_counts[block_id] == 0:
                del self.free_block_ids[block_id]
            self.reference_counts[block_id] += 1
        sequence.block_table = list(match.block_ids)
        sequence.num_hashed_blocks = len(match.block_ids)
        sequence.last_block_hash = match.last_hash
        sequence.num_computed_tokens = len(match.block_ids) * self.block_size
        self.grow(sequence, num_tokens)

    def blocks_short(self, sequence: Sequence, num_tokens: int) -> int:
        """How many blocks the sequence's table lacks to hold `num_tokens` tokens (0 or less: none)."""
        return self.blocks_for_tokens(num_tokens) - len(sequence.block_table)

    def can_grow(self, sequence: Sequence, num_tokens: int) -> bool:
        fresh_needed = self.blocks_short(sequence, num_tokens)
        return fresh_needed <= 0 or fresh_needed <= self.num_free_blocks

    def grow(self, sequence: Sequence, num_tokens: int) -> None:
        """Appends fresh blocks until the sequence's block table covers `num_tokens` tokens."""
        while len(sequence.block_table) < self.blocks_for_tokens(num_tokens):
            sequence.block_table.append(self._take_free_block())

    def free(self, sequence: Sequence) -> None:
        """Releases the sequence's blocks; hashed ones stay in the prefix cache until evicted."""
        for block_id in reversed(sequence.block_table):
            self.reference_counts[block_id] -= 1
            if self.reference_counts[block_id] == 0:
                self.free_block_ids[block_id] = None
                if self.block_hash[block_id] is None:  # nothing worth keeping: hand it out first
                    self.free_block_ids.move_to_end(block_id, last=False)
        sequence.block_table = []
        sequence.num_hashed_blocks = 0
        sequence.last_block_hash = None

    def publish_full_blocks(self, sequence: Sequence) -> None:
        """Publishes the sequence's full, computed blocks to the prefix cache (called after each step, for every
        sequence: most steps fill no block, and return at the first check)."""
        filled_since = sequence.num_computed_tokens >= (sequence.num_hashed_blocks + 1) * self.block_size
        if not self.enable_prefix_caching or not filled_since:
            return
        # Bounded by the tokens read back: a block whose last token is still on the GPU is published later.
        num_full = min(sequence.num_computed_tokens, len(sequence.token_ids)) // self.block_size
        num_full = min(num_full, len(sequence.block_table))
        previous_hash = sequence.last_block_hash
        for block_index in range(sequence.num_hashed_blocks, num_full):
            start = block_index * self.block_size
            block_token_ids = tuple(sequence.token_ids[start : start + self.block_size])
            previous_hash = chain_hash(previous_hash, block_token_ids)
            block_id = sequence.block_table[block_index]
            if previous_hash not in self.cached_block_by_hash:  # else the same content is already published
                self.cached_block_by_hash[previous_hash] = block_id
                self.block_hash[block_id] = previous_hash
                self.block_token_ids[block_id] = block_token_ids
            sequence.num_hashed_blocks = block_index + 1
            sequence.last_block_hash = previous_hash

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        if self.block_hash[block_id] is not None:  # evict it from the prefix cache
            del self.cached_block_by_hash[self.block_hash[block_id]]
            self.block_hash[block_id] = None
            self.block_token_ids[block_id] = None
        self.reference_counts[block_id] = 1
        return block_id
