#!/usr/bin/env python3
"""How long the last wave of a causal attention grid runs, by the order its CTAs start in: a
list-scheduling model of 8-09's Hopper kernels (notes/flash-attention.md, "The order of CTAs").

Each CTA's work is its number of tiles plus half a tile of start-up; the 132 SMs of an H100 each
run one CTA at a time and take the next CTA of the grid when one ends. Printed: the makespan over
the average SM's work (1.00 = perfectly balanced) for three orders of the grid:
  head     head by head (the launch's x fastest): every block of head 0, then of head 1, …
  heads    the head varying fastest: block b of every head before block b + 1 of any
  group4   heads in groups of 4, the head varying fastest inside a group
Forward: 192 queries per CTA (three consumers), key tiles of 128, heaviest block first within a
head; backward: 128 keys per CTA, query tiles of 64 from the diagonal on.
Run: python3 scripts/cta_order_model.py  (batch·heads 16; seq 1024, 4096, 16384)
"""
import heapq
import math

SMS = 132


def makespan(works):
    free = [0.0] * SMS
    for w in works:
        heapq.heappush(free, heapq.heappop(free) + w)
    return max(free)


def ordered(bh, blocks, work, order, group=4):
    if order == "head":
        return [work(b) for _ in range(bh) for b in blocks]
    if order == "heads":
        return [work(b) for b in blocks for _ in range(bh)]
    return [work(b) for _ in range(bh // group) for b in blocks for _ in range(group)]


def forward(bh, n, order):
    nb = math.ceil(n / 192)
    return ordered(bh, range(nb - 1, -1, -1), lambda q: math.ceil(min(n, (q + 1) * 192) / 128) + 0.5, order)


def backward(bh, n, order):
    return ordered(bh, range(n // 128), lambda kb: n // 64 - 2 * kb + 0.5, order)


for n in (1024, 4096, 16384):
    for name, grid in (("forward", forward), ("backward", backward)):
        works = {o: grid(16, n, o) for o in ("head", "heads", "group4")}
        mean = sum(works["head"]) / SMS
        print(f"seq {n:5d} {name:8s} " + "  ".join(f"{o} {makespan(w) / mean:.2f}" for o, w in works.items()))
