"""Fleet mode without a cluster: placement rules, vLLM's Ray-executor argv, per-node weights paths, fleet.json
errors, a slot's own runtime files, and single-box mode never importing Ray (these run in make test-fast)."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import REPO, require

from imageworks_core.errors import ActivationError, PlacementError, SlotLost, SwitchInProgress
from imageworks_core.fleet.config import FleetConfig, load_fleet_config, node_download_path
from imageworks_core.fleet.placement import GpuFree, NodeOffer, place, ray_executor_args
from imageworks_core.runtime.slot import slot_settings
from imageworks_core.schema import ModelEntry
from imageworks_core.settings import Settings, get_settings

GIB = 2**30


def offer(
    name: str,
    *,
    slots: int = 0,
    max_models: int = 1,
    gpus: int = 0,
    free_gib: list[float] | None = None,
    taken: tuple[int, ...] = (),
    weights: bool = True,
    weights_gib: float = 0.001,
) -> NodeOffer:
    free = free_gib if free_gib is not None else [None] * gpus
    return NodeOffer(
        node_id=f"{name}-id-0123456789",
        node_name=name,
        slots_used=slots,
        max_models=max_models,
        gpus=[GpuFree(index=i, memory_free_bytes=None if f is None else int(f * GIB)) for i, f in enumerate(free)],
        gpus_taken=list(taken),
        default_gpus=1 if free else 0,
        weights_path=f"/{name}/weights",
        weights_present=weights,
        weights_bytes=int(weights_gib * GIB),
    )


def test_least_loaded_node_holding_the_weights_wins() -> None:
    offers = [offer("a", slots=1, max_models=2, gpus=2), offer("b", gpus=2, weights=False), offer("c", gpus=2)]
    placement = place("m", "vllm", offers)
    assert (placement.node_name, placement.gpus, placement.members, placement.extra_args) == ("c", [0], [], [])


def test_gpus_with_the_most_free_memory_are_chosen_and_must_hold_the_weights() -> None:
    node = offer("a", max_models=2, free_gib=[4.0, 20.0, 22.0])
    assert place("m", "vllm", [node]).gpus == [2]
    assert place("m", "vllm", [node], gpus=2).gpus == [1, 2]
    big = offer("a", free_gib=[4.0, 5.0], weights_gib=10.0)
    with pytest.raises(
        PlacementError, match=r"a: needs about 12\.0 GiB of GPU memory, 5\.0 GiB free on GPU\(s\) \[1\]"
    ):
        place("m", "vllm", [big])


def test_refusals_name_each_node_and_its_reason() -> None:
    offers = [offer("a", slots=1, max_models=1, gpus=1), offer("b", weights=False), offer("c", gpus=2, taken=(0, 1))]
    with pytest.raises(PlacementError) as info:
        place("m", "vllm", offers)
    assert info.value.exit_code == 8
    assert info.value.message == (
        "no node can take 'm': a: serves 1 of max_models 1; b: weights not found at /b/weights; "
        "c: 0 of 2 GPU(s) free, 1 needed"
    )
    with pytest.raises(PlacementError, match=r"no alive node named 'z' \(alive: a, b, c\)"):
        place("m", "vllm", offers, node="z")


def test_explicit_node_is_that_node_or_nothing() -> None:
    offers = [offer("a", gpus=2), offer("b", slots=1, max_models=3, gpus=2)]
    assert place("m", "vllm", offers, node="b").node_name == "b"
    assert place("m", "vllm", offers, node="b-id-0123").node_name == "b"  # an id prefix works too
    with pytest.raises(PlacementError, match="b: 2 of 2 GPU"):
        place("m", "vllm", offers, node="b", gpus=3)


def test_a_vllm_model_too_big_for_one_node_spans_nodes_with_the_ray_executor() -> None:
    offers = [offer("a", gpus=2), offer("b", gpus=2), offer("c", gpus=1)]
    placement = place("big", "vllm", offers, gpus=4, ray_address="10.0.0.1:6379")
    assert (placement.tensor_parallel_size, placement.pipeline_parallel_size) == (2, 2)
    assert [placement.node_name, *[m.node_name for m in placement.members]] == ["a", "b"]
    assert placement.gpus == [0, 1] and placement.members[0].gpus == [0, 1]
    assert placement.extra_args == [
        "--distributed-executor-backend",
        "ray",
        "--tensor-parallel-size",
        "2",
        "--pipeline-parallel-size",
        "2",
    ]
    assert placement.env == {"RAY_ADDRESS": "10.0.0.1:6379"}
    assert ray_executor_args(1, 3)[-4:] == ["--tensor-parallel-size", "1", "--pipeline-parallel-size", "3"]
    # Only vLLM can span nodes; nor is a split found when no k nodes have N/k free GPUs each.
    with pytest.raises(PlacementError, match="a: 2 of 2 GPU"):
        place("big", "lmdeploy", offers, gpus=4)
    with pytest.raises(PlacementError, match=r"\(spanning nodes\): no 5-GPU split"):
        place("big", "vllm", offers, gpus=5)


def _entry(**fields: object) -> ModelEntry:
    return ModelEntry.model_validate({"name": "m", "backend": "vllm", **fields})


def test_weights_paths_map_per_node_through_download_location(tmp_path: Path) -> None:
    settings = get_settings(tmp_path)
    shared = tmp_path / "shared"
    settings.configs_dir.mkdir(parents=True)
    settings.locations_path.write_text(json.dumps({"locations": {"nas": str(shared)}}))
    config = FleetConfig.model_validate(
        {"defaults": {"max_models": 2}, "nodes": {"gpu2": {"root": "/srv/iw", "locations": {"nas": "/mnt/nas"}}}}
    )
    gpu2, other = config.for_node("gpu2", settings.root), config.for_node("other", settings.root)
    assert (gpu2.root, gpu2.max_models, other.root, other.max_models) == ("/srv/iw", 2, str(settings.root), 2)
    entry = _entry(download_path=str(shared / "Qwen" / "Q7"), download_location="nas")
    assert node_download_path(entry, settings, gpu2) == "/mnt/nas/Qwen/Q7"
    assert node_download_path(entry, settings, other) == str(shared / "Qwen" / "Q7")  # not mapped: as written
    relative = _entry(download_path="demo/models/x")
    assert node_download_path(relative, settings, gpu2) == "demo/models/x"  # resolves against the node's root


def test_a_bad_fleet_config_names_file_field_value_and_shape(tmp_path: Path) -> None:
    settings = get_settings(tmp_path)
    settings.configs_dir.mkdir(parents=True)
    path = settings.configs_dir / "fleet.json"
    path.write_text(json.dumps({"nodes": {"gpu2": {"max_models": 0}}}))
    with pytest.raises(Exception) as info:
        load_fleet_config(settings)
    assert info.value.exit_code == 64  # type: ignore[attr-defined]
    assert str(info.value).startswith(
        f"{path}: nodes.gpu2.max_models: Input should be greater than or equal to 1 (value 0)"
    )
    path.write_text("{")
    with pytest.raises(Exception, match="not valid JSON"):
        load_fleet_config(settings)
    path.unlink()
    assert load_fleet_config(settings).for_node("x", settings.root).max_models == 1


def test_a_slot_has_its_own_state_lock_logs_and_loopback_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_PROXY_VLLM_HOST", "0.0.0.0")
    base = get_settings(tmp_path)
    one = slot_settings(base, tmp_path / "_staging/fleet/i/s1", tmp_path / "logs/fleet/s1", 4001)
    two = slot_settings(base, tmp_path / "_staging/fleet/i/s2", tmp_path / "logs/fleet/s2", 4002)
    assert isinstance(one, Settings)
    assert one.active_state_path == tmp_path / "_staging/fleet/i/s1/active_vllm.json"
    assert one.activation_lock_path != two.activation_lock_path
    assert one.backend_logs_dir == tmp_path / "logs/fleet/s1"
    assert (one.vllm_host, one.vllm_port, two.vllm_port) == ("127.0.0.1", 4001, 4002)
    assert one.history_db_path == base.history_db_path and one.audit_log_path == base.audit_log_path


def test_errors_cross_process_boundaries_with_class_exit_code_and_fields() -> None:
    error = ActivationError("did not start", name="m", log_path=Path("/n/log"), log_tail=["boom"])
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.exit_code, copy.summary, copy.log_tail, str(copy)) == (
        ActivationError,
        6,
        "did not start",
        ["boom"],
        str(error),
    )
    lost = pickle.loads(pickle.dumps(SlotLost("gone", node="n2")))
    assert (lost.node, lost.exit_code) == ("n2", 8)


def test_fleet_mode_asked_for_without_ray_says_how_to_install_it(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    result = cli("current-model", "--ray-address", "auto", "--root", str(tmp_path))
    assert result.code == 8
    assert result.err.startswith("error: fleet mode needs the optional extra: uv sync --extra fleet")
    assert len(result.err.strip().splitlines()) == 1


def test_fleet_options_without_fleet_mode(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEWORKS_RAY_ADDRESS", raising=False)
    result = cli("activate-model", "x", "--node", "n2", "--root", str(tmp_path))
    assert (result.code, result.err.strip()) == (
        64,
        "error: --node and --gpus need fleet mode: set IMAGEWORKS_RAY_ADDRESS or pass --ray-address",
    )
    result = cli("fleet", "--root", str(tmp_path))
    assert result.code == 8 and "fleet mode is off: set IMAGEWORKS_RAY_ADDRESS" in result.err


def test_single_box_front_ends_never_import_ray(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import imageworks_core, imageworks_core.api, imageworks_core.service, imageworks_core.dashboard_data\n"
        "from imageworks_core.cli import commands\n"
        "from imageworks_core.cli.app import app, run\n"
        f"assert run(app, ['current-model', '--root', {str(tmp_path)!r}], 'imageworks-models') == 0\n"
        "print('ray' in sys.modules)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_a_uv_run_driver_does_not_ship_the_checkout_to_fleet_workers(tmp_path: Path) -> None:
    """Under `uv run` (make test, `uv run imageworks-models ...`) Ray would package the current directory and start
    every worker with `uv run` in a copy of it, which times out offline; import_ray keeps that off unless asked."""
    require(importlib.util.find_spec("ray") is not None, "ray is not installed (make bootstrap: uv sync --extra fleet)")
    code = (
        "import os\n"
        "from imageworks_core.fleet.cluster import import_ray\n"
        "import_ray()\n"
        "from ray._private import ray_constants\n"
        "print(ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = lambda extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], cwd=REPO, env={**env, **extra}, capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    assert run({}) == "False"
    assert run({"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "1"}) == "True"  # the operator's explicit choice stands


def test_a_start_in_a_fleet_slot_names_the_slot_not_the_single_port() -> None:
    busy = pickle.loads(pickle.dumps(SwitchInProgress("fleet-a", "slot 3 on node n2")))
    assert busy.message == "'fleet-a' is starting or stopping in slot 3 on node n2; retry in 5 s"
    assert (busy.target, busy.where, busy.exit_code) == ("fleet-a", "slot 3 on node n2", SwitchInProgress.exit_code)
    assert SwitchInProgress("demo").message == "switching the single port to 'demo'; retry in 5 s"


def test_a_fleet_nodes_verification_and_probe_name_the_node_in_every_front_end(tmp_path: Path) -> None:
    from imageworks_core import history
    from imageworks_core.dashboard_data import probe_text, verification_text

    settings = get_settings(tmp_path)
    at = "2026-12-02T10:00:00+00:00"
    history.record_verification(
        settings, name="m", at=at, mode="fast", algorithm="sha256", result="drift", report={"node": "n2"}
    )
    history.record_verification(settings, name="local", at=at, mode="fast", algorithm="sha256", result="ok")
    history.record_probe(settings, "m", {"timestamp": at, "vision_ok": True, "node": "n3"})
    verified, probed = history.latest_verifications(settings), history.latest_probes(settings)
    assert (verified["m"]["node"], verified["local"]["node"], probed["m"]["node"]) == ("n2", None, "n3")
    now = datetime(2026, 12, 2, 10, 5, tzinfo=UTC)
    assert verification_text(verified["m"], now) == "drift on n2 · 5 min ago"
    assert verification_text(verified["local"], now) == "ok · 5 min ago"
    assert probe_text(probed["m"], now) == "vision_ok on n3 · 5 min ago"
