"""Hardware profiles are data: built-in JSON files, user files, and ``--set`` overrides."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshmpi import UsageError, load_hardware
from meshmpi.cli import add_hardware_options, hardware_from_args, parser

PROFILES = Path(__file__).resolve().parents[1] / "meshmpi" / "profiles"
PARAMETERS = ("mesh_rows", "mesh_cols", "sram_bytes_per_core", "clock_hz", "alpha_cycles_per_hop",
              "beta_cycles_per_relay", "link_bytes_per_cycle", "router_queue_bytes", "flops_per_cycle",
              "vector_op_cycles", "scalar_op_cycles", "transfer_start_cycles", "routes_per_core", "element_bytes",
              "pj_per_flop_fp16", "pj_per_flop_fp32", "pj_per_sram_byte_read", "pj_per_sram_byte_written",
              "pj_per_byte_hop", "static_watts_per_core")


@pytest.mark.parametrize("name", ["wse2", "wse3"])
def test_builtin_profiles_load_their_json(name):
    doc = json.loads((PROFILES / f"{name}.json").read_text())
    hw = load_hardware(name)
    assert hw.name == name
    for key in PARAMETERS:
        assert getattr(hw, key) == doc[key]["value"], key
        assert doc[key]["source"], f"{name}.{key} has no source"
    assert set(hw.guessed) == {k for k in PARAMETERS if doc[k].get("guessed")}
    # Every guess says where it comes from, and says it is a guess.
    for key in hw.guessed:
        assert "guess" in hw.sources[key].lower(), (key, hw.sources[key])
    assert isinstance(hw.routes_per_core, int) and isinstance(hw.sram_bytes_per_core, int)


def test_wse2_numbers_from_the_paper():
    hw = load_hardware("wse2")
    assert (hw.mesh_rows, hw.mesh_cols) == (757, 996)
    assert hw.sram_bytes_per_core == 48 * 1024 and hw.routes_per_core == 21
    assert hw.clock_hz == 1.1e9 and hw.link_bytes_per_cycle == 4 and hw.element_bytes == 2
    # The paper gives no alpha, beta or compute rate: they must be marked as guesses.
    assert {"alpha_cycles_per_hop", "beta_cycles_per_relay", "flops_per_cycle"} <= set(hw.guessed)
    assert (load_hardware("wse3").mesh_rows, load_hardware("wse3").mesh_cols) == (762, 1172)
    assert load_hardware(None) == hw


def test_to_json_round_trips_with_guess_marks(tmp_path):
    hw = load_hardware("wse3")
    path = tmp_path / "copy.json"
    path.write_text(hw.to_json())
    doc = json.loads(path.read_text())
    assert {k for k in PARAMETERS if doc[k]["guessed"]} == set(hw.guessed)
    again = load_hardware(str(path))
    assert again.values() == hw.values() and again.guessed == hw.guessed


def test_overrides_apply_and_drop_the_guess_mark():
    shipped = json.loads((PROFILES / "wse2.json").read_text())["beta_cycles_per_relay"]["value"]
    hw = load_hardware("wse2", ["beta_cycles_per_relay=8", "routes_per_core=24", "alpha_cycles_per_hop=0",
                                "clock_hz=2.5e9"])
    assert hw.beta_cycles_per_relay == 8.0 and hw.alpha_cycles_per_hop == 0.0 and hw.clock_hz == 2.5e9
    assert hw.routes_per_core == 24 and isinstance(hw.routes_per_core, int)
    assert "beta_cycles_per_relay" not in hw.guessed and "alpha_cycles_per_hop" not in hw.guessed
    assert "flops_per_cycle" in hw.guessed
    assert hw.sources["beta_cycles_per_relay"] == "set on the command line"
    assert load_hardware("wse2").beta_cycles_per_relay == shipped, "the built-in profile is unchanged"
    assert load_hardware("wse2", []) == load_hardware("wse2")


@pytest.mark.parametrize("assignment, words", [
    ("warp_speed=9", ["warp_speed", "key one of", "alpha_cycles_per_hop"]),
    ("name=wse9", ["key one of"]),
    ("alpha_cycles_per_hop", ["key=value"]),
    ("beta_cycles_per_relay=fast", ["'fast'", "not a number"]),
    ("routes_per_core=2.5", ["whole number"]),
    ("alpha_cycles_per_hop=nan", ["'nan'", "number"]),
    ("routes_per_core=inf", ["'inf'", "number"]),
    ("clock_hz=-inf", ["'-inf'", "number"]),
    ("sram_bytes_per_core=0", ["positive"]),
    ("beta_cycles_per_relay=-1", ["negative"]),
])
def test_bad_overrides_are_usage_errors(assignment, words):
    with pytest.raises(UsageError) as info:
        load_hardware("wse2", [assignment])
    text = str(info.value)
    assert "\n" not in text
    for word in words:
        assert word in text, (word, text)


def test_command_line_options_build_the_profile(tmp_path):
    p = parser("test", "hardware options")
    add_hardware_options(p)
    args = p.parse_args(["--hardware", "wse3", "--set", "flops_per_cycle=8", "--set", "element_bytes=4"])
    hw = hardware_from_args(args)
    assert hw.name == "wse3" and hw.flops_per_cycle == 8 and hw.element_bytes == 4
    with pytest.raises(UsageError):
        hardware_from_args(p.parse_args(["--set", "nope=1"]))
    with pytest.raises(UsageError):
        p.parse_args(["--memory", "lenient"])


def test_user_json_file(tmp_path):
    doc = {"name": "toy", "description": "a toy chip"}
    doc.update({k: {"value": v, "source": "made up", "guessed": k == "flops_per_cycle"} for k, v in
                dict(mesh_rows=8, mesh_cols=8, sram_bytes_per_core=4096, clock_hz=1e9,
                     alpha_cycles_per_hop=2, beta_cycles_per_relay=5, link_bytes_per_cycle=8, router_queue_bytes=16,
                     vector_op_cycles=1, scalar_op_cycles=2, transfer_start_cycles=3,
                     flops_per_cycle=16, routes_per_core=12, element_bytes=4).items()})
    doc["routes_per_core"] = 12  # a bare number is accepted too
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(doc))
    hw = load_hardware(str(path), ["routes_per_core=13"])
    assert hw.name == "toy" and hw.sram_bytes_per_core == 4096 and hw.link_bytes_per_cycle == 8.0
    assert hw.routes_per_core == 13 and hw.guessed == ("flops_per_cycle",)
    assert hw.cycles_to_seconds(2e9) == 2.0


@pytest.mark.parametrize("content, words", [
    (None, ["no such file"]),
    ("{not json", ["invalid JSON"]),
    ("[1, 2]", ["JSON object"]),
    (json.dumps({"name": "x"}), ["missing parameter"]),
    (json.dumps({k: 1 for k in PARAMETERS} | {"clock_hz": "fast"}), ["clock_hz", "not a number"]),
])
def test_bad_profile_files_are_usage_errors(tmp_path, content, words):
    path = tmp_path / "profile.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError) as info:
        load_hardware(str(path))
    for word in words:
        assert word in str(info.value)
