"""Keeping work started ahead of its consumer: one helper for every place that overlaps
producing an item with using the previous one."""

import collections
from typing import Iterable, Iterator, TypeVar

T = TypeVar('T')


def look_ahead(items: Iterable[T], size: int) -> Iterator[T]:
  """`items` in order, with up to `size - 1` of them drawn (started) before the one being
  consumed is handed out: device copies issued a step ahead, futures submitted to a pool
  (at most `size` in flight, so memory stays bounded)."""
  queue = collections.deque()
  for item in items:
    queue.append(item)
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
