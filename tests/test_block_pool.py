import pytest

from cache.block_pool import BlockPool


def test_allocate_in_order_and_say_no_with_none():
    pool = BlockPool(num_blocks=4, block_size=16)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) is None  # only one left: nothing taken
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) == [3]
    assert pool.allocate(1) is None
    pool.check_integrity([[0, 1, 2], [3]])


def test_free_is_tail_first_and_blocks_are_reused_in_that_order():
    pool = BlockPool(num_blocks=4, block_size=16)
    table = pool.allocate(3)
    pool.free(table)
    assert pool.num_free_blocks == 4
    # Block 3 was never used, then 2, 1, 0 came back tail first.
    assert pool.allocate(4) == [3, 2, 1, 0]


def test_shared_blocks_return_only_when_the_last_holder_frees():
    pool = BlockPool(num_blocks=3, block_size=4)
    a = pool.allocate(2)
    pool.share(a)
    assert [pool.ref_count(b) for b in a] == [2, 2]
    pool.check_integrity([a, a])
    pool.free(a)
    assert pool.num_free_blocks == 1
    pool.free(a)
    assert pool.num_free_blocks == 3
    pool.check_integrity([])


def test_misuse_raises():
    pool = BlockPool(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="freed more often"):
        pool.free([0])
    with pytest.raises(ValueError, match="is free"):
        pool.share([1])
    with pytest.raises(ValueError):
        BlockPool(num_blocks=0, block_size=4)


def test_blocks_for_tokens():
    pool = BlockPool(num_blocks=2, block_size=16)
    assert [pool.blocks_for_tokens(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_check_integrity_catches_a_wrong_ref_count():
    pool = BlockPool(num_blocks=2, block_size=4)
    pool.allocate(1)
    with pytest.raises(AssertionError):
        pool.check_integrity([[0], [0]])
