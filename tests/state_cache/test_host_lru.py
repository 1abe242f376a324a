import torch

from server.state_cache.host import HostEntry, HostLRU


def entry(nbytes: int, n: int = 1) -> HostEntry:
    return HostEntry({"s": torch.zeros(nbytes // 4)}, num_tokens=n, prefix_hash=b"\0" * 32)


def test_evicts_in_lru_order_within_byte_budget():
    evicted = []
    lru = HostLRU(budget_bytes=1000, pin_memory=False, on_evict=lambda k, e: evicted.append(k))
    for k in "abc":
        assert lru.put(k, entry(300))
    assert lru.bytes_used == 900 and lru.keys() == ["a", "b", "c"]
    assert lru.get("a") is not None  # a becomes most recent: b is now the oldest
    lru.put("d", entry(300))
    assert evicted == ["b"] and lru.keys() == ["c", "a", "d"]
    lru.put("e", entry(600))  # needs two victims, oldest first
    assert evicted == ["b", "c", "a"] and lru.keys() == ["d", "e"]
    assert lru.bytes_used == 900 <= lru.budget_bytes
    assert lru.evictions == 3 and lru.hits == 1
    assert lru.get("b") is None and lru.misses == 1


def test_peek_does_not_reorder_and_replace_updates_bytes():
    lru = HostLRU(budget_bytes=1000, pin_memory=False)
    lru.put("a", entry(400))
    lru.put("b", entry(400))
    assert lru.peek("a") is not None and lru.keys() == ["a", "b"]
    lru.put("a", entry(100))
    assert lru.bytes_used == 500 and lru.keys() == ["b", "a"]
    assert lru.pop("b") is not None and lru.bytes_used == 100


def test_entry_bigger_than_budget_is_refused_without_evicting():
    lru = HostLRU(budget_bytes=1000, pin_memory=False)
    lru.put("a", entry(800))
    assert not lru.put("big", entry(2000))
    assert lru.keys() == ["a"] and lru.rejected == 1
    assert lru.stats()["host_bytes"] == 800


def test_prepare_keeps_cpu_tensors_without_pinning():
    lru = HostLRU(budget_bytes=1 << 20, pin_memory=False)
    t = torch.ones(4)
    assert lru.prepare({"x": t})["x"] is not None
    assert lru.prepare({"x": t})["x"].data_ptr() == t.data_ptr()
