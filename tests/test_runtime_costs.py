"""Every formula of meshmpi/costs.py against its closed form, on a profile with round numbers."""
import numpy as np
import pytest

from meshmpi import costs, load_hardware

ALPHA, BETA, BANDWIDTH, RATE = 3.0, 7.0, 4.0, 2.0


@pytest.fixture
def hw():
    return load_hardware("wse2").with_overrides([f"alpha_cycles_per_hop={ALPHA}", f"beta_cycles_per_relay={BETA}",
                                                 f"link_bytes_per_cycle={BANDWIDTH}", f"flops_per_cycle={RATE}"])


def test_serialisation_is_bytes_over_bandwidth_times_the_sharing(hw):
    assert costs.serialisation(hw, 20) == 5.0
    assert np.array_equal(costs.serialisation(hw, 20, np.array([1, 3])), [5.0, 15.0])


def test_route_latency_is_alpha_per_hop_and_beta_per_relay(hw):
    assert costs.route_latency(hw, 4) == 12.0
    assert costs.route_latency(hw, 4, 3) == 12.0 + 21.0


def test_arrival_is_departure_plus_head_plus_one_payload(hw):
    assert costs.arrival(hw, 100.0, 4, 3, 20) == 100.0 + 12.0 + 21.0 + 5.0
    assert costs.arrival(hw, 100.0, 4, 0, 20, load=2) == 100.0 + 12.0 + 10.0
    assert costs.arrival(hw, 100.0, 1, 0, 0) == 103.0          # a head alone


def test_compute_and_software_stage(hw):
    assert costs.compute(hw, 90) == 45.0
    assert costs.software_stage(hw) == BETA


def test_streamed_payload_is_the_slower_of_link_and_add(hw):
    assert costs.streamed_payload(hw, 40) == 10.0                       # link-bound
    assert costs.streamed_payload(hw, 40, flops_per_core=60) == 30.0    # add-bound


def test_streaming_stage_head_waits_for_the_head_and_the_core(hw):
    assert costs.streaming_stage_head(hw, 50.0, 10.0) == 57.0           # the head is later
    assert costs.streaming_stage_head(hw, 50.0, 80.0) == 87.0           # the core is later
