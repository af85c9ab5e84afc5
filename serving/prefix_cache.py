"""Automatic prefix caching: recent prompts' KV caches kept on the device, so that a prompt which
begins like one of them prefills only what follows (a chat's system prompt, few-shot examples, the
earlier turns of a conversation, an eval's shared instructions).

What it keeps. An entry is a copy of one prompt's cache as its prefill left it (one [1, bucket,
kv_heads, head_dim] array per layer for keys and for values). Entries are
indexed in blocks of BLOCK tokens, like vLLM's automatic prefix caching: a chained digest of each
block-aligned prefix (the digest of blocks 1..k covers every token before them) points to the
newest entry holding those k blocks, so a lookup finds the longest block-aligned prefix any entry
shares with the prompt in one pass over the prompt's blocks, whatever the number of entries. A
hit is checked token by token against the entry before use, so a digest collision cannot change
an answer. An entry all of whose blocks a newer entry also holds (the previous turn of a
conversation, now the start of the next) is dropped at once; beyond that, least recently used
entries go first once their bucket lengths pass `capacity` tokens.

Why not vLLM's paged layout (block tables, shared blocks, copy-on-write). The engine's slots are
contiguous per sequence (JetStream's layout, which the decode loop and its attention kernels
read without a block table), so a hit copies the shared prefix into the new prompt's cache once
(a device copy of m positions, against a prefill's forward pass over them); the cost is that two
entries sharing a system prompt each hold a copy of it, which `capacity` accounts for.

Why the parameters are part of the key. Keys and values depend on the weights: an RL step or a
`load_params` that swaps them makes every entry wrong. The cache remembers the parameter arrays
its entries were computed with and empties itself when a prefill brings others.
"""
import collections
import dataclasses
import hashlib

import jax
import numpy as np

BLOCK = 16  # Tokens per block: the granularity at which prefixes are matched and reused.


@dataclasses.dataclass
class _Entry:
  tokens: np.ndarray  # The prompt (int32), of which the whole blocks are indexed.
  cache: list  # Its KV cache: [{'k', 'v'}] per layer, [1, size, kv_heads, head_dim].
  size: int  # Cached positions (the prompt's bucket), what capacity counts.
  digests: list  # Chained digests of its blocks.
  owned: int  # Of those, how many the index still points to this entry for.


class PrefixCache:
  """Prompts' KV caches by prefix, least recently used evicted first past `capacity` tokens."""

  def __init__(self, capacity: int, block: int = BLOCK):
    if capacity < block:
      raise ValueError(f'prefix cache capacity must be at least one block ({block} tokens), got '
                       f'{capacity}')
    self.capacity, self.block = capacity, block
    self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # LRU first
    self._index: dict[bytes, int] = {}  # digest of blocks 1..k -> id of the newest entry with them
    self._params = None  # The parameter arrays the entries were computed with.
    self._next = 0
    self.used = 0  # Positions held by the entries.
    # Prompt tokens looked up, and of those, found in the cache (vLLM's prefix_cache_queries and
    # prefix_cache_hits); entries dropped for room or made redundant.
    self.queries = self.hits = self.evictions = 0

  def __len__(self) -> int:
    return len(self._entries)

  def stats(self) -> dict:
    return {'queries': self.queries, 'hits': self.hits, 'entries': len(self._entries),
            'tokens': self.used, 'capacity': self.capacity, 'evictions': self.evictions}

  def clear(self):
    """Drops every entry (the counters stay)."""
    self._entries.clear()
    self._index.clear()
    self.used = 0

  def reset(self):
    """Drops every entry and zeroes the counters."""
    self.clear()
    self._params = None
    self.queries = self.hits = self.evictions = 0

  def sync(self, params):
    """Empties the cache if `params` are not the arrays its entries were computed with."""
    leaves = jax.tree.leaves(params)
    old = self._params
    if old is None or len(old) != len(leaves) or any(a is not b for a, b in zip(old, leaves)):
      self.clear()
      self._params = leaves

  def _digests(self, tokens: np.ndarray, n: int) -> list[bytes]:
    """Chained digests of tokens[:k * block] for k = 1 .. n // block."""
    out, h = [], b''
    for k in range(n // self.block):
      h = hashlib.blake2b(h + tokens[k * self.block:(k + 1) * self.block].tobytes(),
                          digest_size=16).digest()
      out.append(h)
    return out

  def lookup(self, tokens, limit: int) -> tuple[int, list | None]:
    """(m, cache): the longest block-aligned prefix of `tokens`, at most `limit` long, that an
    entry holds, and that entry's cache (positions [0, m) are the prompt's); (0, None) if none.
    Counts the prompt's tokens as queried; the caller counts what it reuses (`hit`)."""
    tokens = np.asarray(tokens, np.int32)
    self.queries += len(tokens)
    digests = self._digests(tokens, min(limit, len(tokens)))
    for k in range(len(digests), 0, -1):
      key = self._index.get(digests[k - 1])
      if key is None:
        continue
      entry, m = self._entries[key], k * self.block
      if np.array_equal(entry.tokens[:m], tokens[:m]):
        self._entries.move_to_end(key)
        return m, entry.cache
    return 0, None

  def holds(self, tokens) -> bool:
    """Whether every whole block of `tokens` is cached already (store would keep nothing)."""
    tokens = np.asarray(tokens, np.int32)
    digests = self._digests(tokens, len(tokens))
    return not digests or digests[-1] in self._index

  def hit(self, n: int):
    self.hits += n

  def store(self, tokens, cache, size: int):
    """Keeps `cache` (a prefill's, valid for every position of `tokens`) for later prompts."""
    tokens = np.asarray(tokens, np.int32)
    digests = self._digests(tokens, len(tokens))
    if not digests or size > self.capacity:
      return
    held = self._index.get(digests[-1])
    if held is not None:  # Every block of it is cached already (chained digests).
      self._entries.move_to_end(held)
      return
    key, self._next = self._next, self._next + 1
    for d in digests:
      before = self._index.get(d)
      if before is not None:
        self._entries[before].owned -= 1
        if self._entries[before].owned == 0:  # The new entry holds all its blocks.
          self._drop(before)
      self._index[d] = key
    self._entries[key] = _Entry(tokens, cache, size, digests, len(digests))
    self.used += size
    while self.used > self.capacity:
      self._drop(next(iter(self._entries)))

  def _drop(self, key: int):
    entry = self._entries.pop(key)
    for d in entry.digests:
      if self._index.get(d) == key:
        del self._index[d]
    self.used -= entry.size
    self.evictions += 1
