"""docker-compose.yml wires the stack as the README says (no Docker engine here: parsed, not run)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_every_service_is_there() -> None:
    assert set(SERVICES) == {"postgres", "rabbitmq", "redis", "migrate", "worker", "flower", "api"}


def test_infrastructure_services_have_healthchecks() -> None:
    for name in ("postgres", "rabbitmq", "redis"):
        assert SERVICES[name]["healthcheck"]["test"], name


def test_rabbitmq_has_the_management_plugin_for_flower() -> None:
    assert "management" in SERVICES["rabbitmq"]["image"]
    assert any("15672" in port for port in SERVICES["rabbitmq"]["ports"])
    assert SERVICES["flower"]["environment"]["DEEPBATCH_FLOWER_BROKER_API"].endswith("@rabbitmq:15672/api/")


def test_migrate_runs_once_after_postgres_is_healthy() -> None:
    migrate = SERVICES["migrate"]
    assert migrate["command"] == ["deepbatch", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"


def test_worker_waits_for_migrations_and_broker_and_reserves_a_gpu() -> None:
    worker = SERVICES["worker"]
    assert worker["command"] == ["deepbatch", "worker"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1


def test_app_services_share_urls_that_point_at_the_compose_services() -> None:
    for name in ("migrate", "worker", "flower", "api"):
        environment = SERVICES[name]["environment"]
        assert "@postgres:5432/" in environment["DATABASE_URL"], name
        assert "@rabbitmq:5672/" in environment["BROKER_URL"], name


def test_flower_requires_credentials() -> None:
    flower = SERVICES["flower"]
    assert flower["command"] == ["deepbatch", "flower"]
    assert flower["environment"]["DEEPBATCH_FLOWER_USER"].startswith("${FLOWER_USER:?")
    assert flower["environment"]["DEEPBATCH_FLOWER_PASSWORD"].startswith("${FLOWER_PASSWORD:?")


def test_env_example_sets_every_variable_compose_requires() -> None:
    example = (REPO_ROOT / ".env.example").read_text()
    for variable in ("POSTGRES_PASSWORD", "RABBITMQ_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD", "DEEPBATCH_MODEL"):
        assert f"{variable}=" in example


def test_api_serves_on_all_interfaces_and_keeps_its_files_in_a_volume() -> None:
    api = SERVICES["api"]
    assert api["command"] == ["deepbatch", "serve"] and "8000:8000" in api["ports"]
    assert api["environment"]["DEEPBATCH_API_HOST"] == "0.0.0.0"
    assert f"api-files:{api['environment']['DEEPBATCH_FILES_DIR']}" in api["volumes"]
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
