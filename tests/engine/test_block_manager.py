"""The block manager: reference counts, prefix-hash sharing, eviction of cached free blocks."""

from __future__ import annotations

from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Sequence
from worker.engine.types import SamplingParams


def admitted(manager: BlockManager, token_ids: list[int]) -> Sequence:
    """A sequence admitted with all its tokens computed and its full blocks published."""
    sequence = Sequence(token_ids, SamplingParams())
    match = manager.match_prefix(sequence)
    assert manager.can_admit(match, len(token_ids))
    manager.admit(sequence, match, len(token_ids))
    sequence.num_computed_tokens = len(token_ids)
    manager.publish_full_blocks(sequence)
    return sequence


def test_allocate_and_free_return_every_block():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    sequence = admitted(manager, list(range(10)))
    assert len(sequence.block_table) == 3
    assert manager.num_free_blocks == 5
    manager.free(sequence)
    assert manager.num_free_blocks == 8
    assert sequence.block_table == []


def test_shared_prefix_blocks_are_reused_with_reference_counts():
    manager = BlockManager(num_blocks=8, block_size=4)
    first = admitted(manager, list(range(10)))  # blocks: [0..3] [4..7] [8, 9]
    second = admitted(manager, list(range(8)) + [50, 51, 52])
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert manager.reference_counts[first.block_table[0]] == 2
    assert manager.prefix_cache_hit_blocks == 2
    manager.free(first)
    assert manager.reference_counts[second.block_table[0]] == 1


def test_last_token_block_is_never_matched():
    """A prompt fully covered by cached blocks still computes its last block (its logits are needed)."""
    manager = BlockManager(num_blocks=8, block_size=4)
    admitted(manager, list(range(8)))
    again = Sequence(list(range(8)), SamplingParams())
    assert len(manager.match_prefix(again).block_ids) == 1


def test_freed_blocks_stay_cached_until_evicted():
    manager = BlockManager(num_blocks=4, block_size=4)
    first = admitted(manager, list(range(9)))
    manager.free(first)
    reused = admitted(manager, list(range(8)) + [99])
    assert manager.prefix_cache_hit_blocks == 2
    manager.free(reused)
    # Fresh tokens filling the whole cache evict every cached block.
    admitted(manager, [1000 + t for t in range(16)])
    assert manager.match_prefix(Sequence(list(range(9)), SamplingParams())).block_ids == []


def test_unhashed_blocks_are_handed_out_before_cached_ones():
    manager = BlockManager(num_blocks=4, block_size=4)
    cached = admitted(manager, list(range(5)))  # one full (hashed) block, one partial
    manager.free(cached)
    other = admitted(manager, [500, 501])  # needs one block: must not evict the hashed one
    assert len(manager.match_prefix(Sequence(list(range(5)), SamplingParams())).block_ids) == 1
    manager.free(other)


def test_prefix_caching_off_never_hits():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    admitted(manager, list(range(9)))
    second = admitted(manager, list(range(9)))
    assert manager.prefix_cache_hit_blocks == 0
    assert manager.num_free_blocks == 2
    assert second.num_hashed_blocks == 0
