"""Where a model goes: pure functions from the nodes' offers to a :class:`Placement` (no Ray, no I/O).

Rules, in order:

1. An explicit node (``--node``): that node or nothing; each refusal says why.
2. Otherwise the candidates are alive nodes that hold the entry's weights and have room under their
   ``max_models``; the least loaded wins (fewest models, then most free GPUs, then most free GPU memory, then
   the name).
3. GPUs: ``--gpus N``, else what the launch asks for (its ``--tensor-parallel-size``, 1 by default) on a node
   with GPUs, 0 on a node without. The GPUs with the most free memory are chosen; when NVML reports memory, the
   weights x ``IMAGEWORKS_GPU_OVERHEAD_FACTOR`` must fit in their free memory (the node re-checks at start).
4. More GPUs than any one node has free: a vLLM entry runs with vLLM's Ray executor over k nodes of N/k GPUs
   each (``--distributed-executor-backend ray --tensor-parallel-size N/k --pipeline-parallel-size k``, and
   ``RAY_ADDRESS`` in its environment), started by its leader node's agent; the other nodes' GPUs are reserved
   for it (``members``). The smallest k that fits wins. vLLM's own Ray workers are placed by Ray's GPU
   accounting, which does not see our single-node slots: give such models nodes of their own.
5. Autoswitch (a request through the API for a model that runs nowhere) when no node has room: evict
   (:func:`place_evicting`). The victim is the least recently used slot (by its last request, else since it
   became ready) among those whose eviction lets their node take the entry (weights there, GPUs enough once
   the victim's are free); a slot with a request in flight, one still starting or stopping, and one spanning
   nodes are never evicted.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

from ..errors import PlacementError, WeightsError
from .slots import SlotInfo, choose_gpus

RAY_EXECUTOR_BACKENDS = frozenset({"vllm"})
"""Backends that can span nodes (vLLM's ``--distributed-executor-backend ray``)."""


class GpuFree(BaseModel):
    """One GPU of a node as an offer sees it."""

    index: int
    memory_free_bytes: int | None = None
    memory_total_bytes: int | None = None
    name: str = ""


class NodeOffer(BaseModel):
    """What one node's agent says about taking an entry (:meth:`NodeAgent.offer`)."""

    node_id: str
    node_name: str
    slots_used: int
    max_models: int
    gpus: list[GpuFree] = Field(default_factory=list, description="every GPU of the node")
    gpus_taken: list[int] = Field(default_factory=list, description="held by slots or reserved for spanning ones")
    default_gpus: int = Field(description="GPUs the entry asks for on this node without --gpus")
    weights_path: str | None = None
    weights_present: bool = False
    weights_bytes: int = 0
    overhead_factor: float = 1.2
    serving: str | None = Field(default=None, description="slot id of a slot of this node that runs the entry")

    @property
    def free_gpus(self) -> list[GpuFree]:
        return [g for g in self.gpus if g.index not in set(self.gpus_taken)]


class Member(BaseModel):
    """GPUs a spanning model holds on another node."""

    node_id: str
    node_name: str
    gpus: list[int]


class Placement(BaseModel):
    """Where and how an entry runs: the leader node and its GPUs, other nodes' GPUs, extra argv and env."""

    node_id: str
    node_name: str
    gpus: list[int]
    members: list[Member] = Field(default_factory=list)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    extra_args: list[str] = Field(default_factory=list, description="appended to the entry's launch argv")
    env: dict[str, str] = Field(default_factory=dict, description="added to the backend's environment")
    note: str = ""


def ray_executor_args(tensor_parallel: int, pipeline_parallel: int) -> list[str]:
    """vLLM's arguments for a model spread over ``pipeline_parallel`` nodes of ``tensor_parallel`` GPUs."""
    return [
        "--distributed-executor-backend",
        "ray",
        "--tensor-parallel-size",
        str(tensor_parallel),
        "--pipeline-parallel-size",
        str(pipeline_parallel),
    ]


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _fit(offer: NodeOffer, count: int, share: float = 1.0) -> tuple[list[int] | None, str]:
    """(GPU indexes, '') when ``count`` free GPUs of the node hold ``share`` of the weights, else (None, why)."""
    free = offer.free_gpus
    chosen = choose_gpus(count, [g.model_dump() for g in free], [])
    if chosen is None:
        return None, f"{len(free)} of {len(offer.gpus)} GPU(s) free, {count} needed"
    known = [g.memory_free_bytes for g in free if g.index in chosen and g.memory_free_bytes is not None]
    if count and offer.weights_bytes and len(known) == count and offer.overhead_factor > 0:
        needed = int(offer.weights_bytes * offer.overhead_factor * share)
        if needed > sum(known):
            return None, f"needs about {_gib(needed)} of GPU memory, {_gib(sum(known))} free on GPU(s) {chosen}"
    return chosen, ""


def _load_key(offer: NodeOffer) -> tuple[int, int, int, str]:
    free_memory = sum(g.memory_free_bytes or 0 for g in offer.free_gpus)
    return (offer.slots_used, -len(offer.free_gpus), -free_memory, offer.node_name)


def _refusal(offer: NodeOffer) -> str | None:
    """Why the node cannot lead a slot for the entry at all (before GPUs are counted), else None."""
    if not offer.weights_present:
        return f"weights not found at {offer.weights_path}" if offer.weights_path else "the entry has no weights path"
    if offer.slots_used >= offer.max_models:
        return f"serves {offer.slots_used} of max_models {offer.max_models}"
    return None


def named(offers: Sequence[NodeOffer], node: str) -> NodeOffer:
    """The offer of node ``node`` (a name, an id, or an id prefix of 6+ characters); PlacementError when no alive
    node, or more than one, answers to it."""
    pool = [o for o in offers if node in (o.node_name, o.node_id) or (len(node) >= 6 and o.node_id.startswith(node))]
    if not pool:
        known = ", ".join(sorted(o.node_name for o in offers))
        raise PlacementError(f"no alive node named {node!r} (alive: {known}); see `imageworks-models fleet`")
    if len(pool) > 1:
        ids = ", ".join(o.node_id[:12] for o in pool)
        raise PlacementError(f"{len(pool)} alive nodes are named {node!r}; give a node id instead ({ids})")
    return pool[0]


def verifier(name: str, offers: Sequence[NodeOffer], *, node: str | None = None) -> NodeOffer:
    """The node that verifies entry ``name``'s weights: ``node`` when given; else the node serving it; else the
    least loaded node holding its weights (as :func:`place` ranks them, room or not: hashing needs no slot).
    WeightsError (exit 7) when no alive node holds them, with where each node looked."""
    if node is not None:
        return named(offers, node)
    for pool in ([o for o in offers if o.serving], [o for o in offers if o.weights_present]):
        if pool:
            return min(pool, key=_load_key)
    if not offers:
        raise PlacementError(f"no alive node in the fleet can verify {name!r}")
    where = "; ".join(f"{o.node_name}: {_refusal(o)}" for o in sorted(offers, key=lambda o: o.node_name))
    raise WeightsError(f"no alive node holds the weights of {name!r} ({where})")


def place(
    name: str,
    backend: str | None,
    offers: Sequence[NodeOffer],
    *,
    node: str | None = None,
    gpus: int | None = None,
    ray_address: str = "",
) -> Placement:
    """The placement of entry ``name`` among ``offers`` (alive nodes only); PlacementError with every node's
    reason when none fits. ``node`` is a node name or id (prefix) and must be among the offers."""
    if gpus is not None and gpus < 0:
        raise PlacementError(f"--gpus must be 0 or more, not {gpus}")
    if not offers:
        raise PlacementError(f"no alive node in the fleet can take {name!r}")
    pool = [named(offers, node)] if node is not None else list(offers)
    reasons: dict[str, str] = {}
    fits: list[tuple[NodeOffer, list[int]]] = []
    for offer in pool:
        why = _refusal(offer)
        if why is None:
            chosen, why = _fit(offer, offer.default_gpus if gpus is None else gpus)
            if chosen is not None:
                fits.append((offer, chosen))
                continue
        reasons[offer.node_name] = why
    if fits:
        offer, chosen = min(fits, key=lambda pair: _load_key(pair[0]))
        return Placement(node_id=offer.node_id, node_name=offer.node_name, gpus=chosen)
    if node is None and gpus is not None and gpus > 1 and backend in RAY_EXECUTOR_BACKENDS:
        spanning = _span(name, pool, gpus, ray_address)
        if spanning is not None:
            return spanning
        reasons["(spanning nodes)"] = f"no {gpus}-GPU split over 2 or more nodes (N/k free GPUs on each of k nodes)"
    detail = "; ".join(f"{who}: {why}" for who, why in sorted(reasons.items()))
    raise PlacementError(f"no node can take {name!r}: {detail}")


def _span(name: str, offers: Sequence[NodeOffer], gpus: int, ray_address: str) -> Placement | None:
    """The smallest split of ``gpus`` over k >= 2 nodes with N/k free GPUs each (the leader needs room for a
    model, the members only GPUs), or None."""
    for k in range(2, len(offers) + 1):
        if gpus % k:
            continue
        per = gpus // k
        chosen: list[tuple[NodeOffer, list[int]]] = []
        for offer in sorted(offers, key=_load_key):
            if not offer.weights_present:
                continue
            picked, _why = _fit(offer, per, share=1 / k)
            if picked is not None:
                chosen.append((offer, picked))
        leaders = [pair for pair in chosen if pair[0].slots_used < pair[0].max_models]
        if len(chosen) < k or not leaders:
            continue
        leader = leaders[0]
        members = [pair for pair in chosen if pair is not leader][: k - 1]
        return Placement(
            node_id=leader[0].node_id,
            node_name=leader[0].node_name,
            gpus=leader[1],
            members=[Member(node_id=o.node_id, node_name=o.node_name, gpus=g) for o, g in members],
            tensor_parallel_size=per,
            pipeline_parallel_size=k,
            extra_args=ray_executor_args(per, k),
            env={"RAY_ADDRESS": ray_address} if ray_address else {},
            note=f"{name!r} spans {k} nodes of {per} GPU(s) with vLLM's Ray executor",
        )
    return None


def evictable(slot: SlotInfo) -> bool:
    """Whether autoswitch may stop the slot to make room: ready, idle right now, on one node only."""
    return slot.status == "ready" and not slot.requests_in_flight and not slot.members


def place_evicting(
    name: str,
    backend: str | None,
    offers: Sequence[NodeOffer],
    slots: Sequence[SlotInfo],
    *,
    refused: PlacementError,
) -> tuple[Placement, SlotInfo]:
    """Where ``name`` goes after evicting one slot (see rule 5), and that slot. ``refused``: :func:`place`'s
    refusal, kept in the PlacementError raised when no eviction helps either."""
    by_node = {offer.node_id: offer for offer in offers}
    oldest_first = sorted((s for s in slots if evictable(s) and s.node_id in by_node), key=_last_use_key)
    for victim in oldest_first:
        offer = by_node[victim.node_id]
        if not offer.weights_present:
            continue
        freed = [
            g.model_copy(update={"memory_free_bytes": g.memory_total_bytes})
            if g.index in victim.gpus and g.memory_total_bytes is not None
            else g
            for g in offer.gpus
        ]
        after = offer.model_copy(
            update={
                "slots_used": offer.slots_used - 1,
                "gpus": freed,
                "gpus_taken": [i for i in offer.gpus_taken if i not in victim.gpus],
            }
        )
        try:
            return place(name, backend, [after], node=offer.node_id), victim
        except PlacementError:
            continue
    raise PlacementError(f"{refused.message}; and no idle ready slot can be evicted to make room")


def _last_use_key(slot: SlotInfo) -> tuple[float, str]:
    when = slot.last_use
    return (when.timestamp() if when is not None else 0.0, slot.slot_id)
