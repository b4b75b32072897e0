"""The cost model: every formula for modeled time, in cycles (PAPER.md §1, the PLMR model).

The fabric, the mesh and the kernels take their times from here and nowhere else; each
formula has a test against its closed form (tests/test_runtime_costs.py). ``hw`` is a
:class:`meshmpi.hardware.Hardware` profile: ``alpha`` (cycles per hop on a pass-through route),
``beta`` (cycles of one software stage on a core), ``link_bytes_per_cycle``,
``router_queue_bytes``, ``flops_per_cycle`` and the fixed costs of starting a vector
operation, a scalar operation and a transfer, all stated with their sources in the profile.
"""
from __future__ import annotations

import numba
import numpy as np


def serialisation(hw, nbytes, load=1):
    """Cycles to push ``nbytes`` through one directed link, shared by ``load`` messages of the
    same pattern (each then gets 1/load of the link): ``load * nbytes / bandwidth``."""
    return np.asarray(load) * nbytes / hw.link_bytes_per_cycle


def route_latency(hw, hops, relays=0):
    """Head latency of a message over ``hops`` links: ``alpha`` per hop on a pass-through route
    and ``beta`` for each intermediate core that forwards it in software (PAPER.md §1, L)."""
    return hw.alpha_cycles_per_hop * np.asarray(hops) + hw.beta_cycles_per_relay * np.asarray(relays)


def arrival(hw, depart, hops, relays, nbytes, load=1):
    """When a message's tail reaches its destination: cut-through, the head moves ``alpha`` a hop
    (plus ``beta`` per software relay) and the payload follows once,
    ``depart + alpha*hops + beta*relays + load*bytes/bandwidth``."""
    return depart + route_latency(hw, hops, relays) + serialisation(hw, nbytes, load)


def line_stream(hw, tiles, hops, nbytes):
    """A line of ``tiles`` cores each sending its tile ``hops`` links on along the line, as one
    region hands its activations to the next one beside it (every tile crosses the one link
    between the regions): the link on the boundary carries every tile back to back, so the
    last tile lands ``transfer_start + alpha*hops + tiles*bytes/bandwidth`` after they start."""
    return transfer_start(hw) + route_latency(hw, hops) + tiles * serialisation(hw, nbytes)


def compute(hw, flops, ops=0, scalars=0):
    """Cycles of local work on one core: ``flops / flops_per_cycle`` for the arithmetic, plus
    the fixed cost of starting each of its ``ops`` vector operations (``vector_op_cycles``)
    and of each of its ``scalars`` scalar operations such as a square root or a reciprocal
    (``scalar_op_cycles``)."""
    return (np.asarray(flops) / hw.flops_per_cycle + np.asarray(ops) * hw.vector_op_cycles
            + np.asarray(scalars) * hw.scalar_op_cycles)


def transfer_start(hw):
    """Cycles a core spends starting one fabric operation (a send or a receive: setting up its
    descriptors and routes' queues) before the data can move: ``transfer_start_cycles``."""
    return hw.transfer_start_cycles


def software_stage(hw):
    """One software stage of a collective on a core (receive, combine, forward control): ``beta``."""
    return hw.beta_cycles_per_relay


def streamed_payload(hw, nbytes, flops_per_core=0):
    """How long a vector takes to pass through a streaming stage that combines it on the way
    (a fabric-in, fabric-out add, PAPER.md §3): the link's serialisation or the core's
    arithmetic, whichever is slower, ``max(bytes/bandwidth, flops/flops_per_cycle)``."""
    return np.maximum(serialisation(hw, nbytes), compute(hw, flops_per_core))


def streaming_stage_head(hw, head_arrival, ready):
    """When a streaming stage starts sending its combined output: once the incoming head has
    arrived and the core is ready, after one software stage of control,
    ``max(head_arrival, ready) + beta``."""
    return np.maximum(head_arrival, ready) + software_stage(hw)


def path_capacity(hw, hops):
    """Cycles of payload a path of ``hops`` links holds in flight when its head is blocked at
    the destination: each hop's pipeline (``alpha`` cycles at link rate) plus its router's input
    queue (``router_queue_bytes``), ``hops * (alpha + queue/bandwidth)``."""
    per_hop = hw.alpha_cycles_per_hop + hw.router_queue_bytes / hw.link_bytes_per_cycle
    return np.asarray(hops) * per_hop


@numba.vectorize(cache=True)
def landing(head_arrival, posted, tail):
    """When a message is in the receiver's buffer: the receiver accepts it once the head has
    arrived and it has posted the receive (its program reached the receive, the buffer is
    free), then the payload drains in at link rate, ``max(head, posted) + tail``. (A numpy
    ufunc, also callable on one message from compiled code, as the fabric's inner loops do.)"""
    return max(head_arrival, posted) + tail


@numba.vectorize(cache=True)
def send_completion(depart, occupancy, landed, capacity):
    """When the sender's buffer is free again (its send operation completes): the tail has left
    the source, ``depart + occupancy``, and at most ``capacity`` cycles of payload are still in
    the fabric, ``landed - capacity``. A late receiver therefore stalls the sender once the
    path is full (back-pressure); a ready one never does. (A ufunc, as :func:`landing`.)"""
    return max(depart + occupancy, landed - capacity)
