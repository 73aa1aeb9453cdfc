"""docker/docker-compose.yml is a file `docker compose` accepts (issue 14): the machines here have no
Docker engine, so it is checked against the Compose Specification's JSON schema (what compose-go
validates against before doing anything; tests/fixtures/compose/README.md), and podman-compose runs it
for real in ./scripts/test-image."""
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "tests" / "fixtures" / "compose" / "compose-spec.json").read_text())
COMPOSE = REPO / "docker" / "docker-compose.yml"


def errors(document) -> list:
    return sorted(e.message for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(document))


def test_the_compose_file_follows_the_compose_specification():
    assert errors(yaml.safe_load(COMPOSE.read_text())) == []


@pytest.mark.parametrize("change, complaint", [
    (lambda s: s.update(restart_policy="always"), "'restart_policy' does not match any of the regexes"),
    (lambda s: s["build"].update(file="Dockerfile"), "is not valid under any of the given schemas"),
    (lambda s: s.update(stop_grace_period=30), "30 is not of type 'string'"),
    (lambda s: s.update(ports=8080), "8080 is not of type 'array'"),
])
def test_the_schema_catches_what_docker_compose_would_refuse(change, complaint):
    """The check can fail: a wrong type, an unknown key (compose-go refuses both)."""
    document = yaml.safe_load(COMPOSE.read_text())
    change(document["services"]["slurm"])
    assert any(complaint in e for e in errors(document)), errors(document)


def test_what_the_image_and_the_smoke_test_rely_on():
    """init (signals reach the entrypoint), privileged (namespaces, mknod), a build from the repository
    root, and the names scripts/test-image sets for its own run (a tag and a node count of its own, so a
    user's cluster from the README's commands is never the one it removes)."""
    slurm = yaml.safe_load(COMPOSE.read_text())["services"]["slurm"]
    assert slurm["init"] is True and slurm["privileged"] is True
    assert slurm["image"] == "${HPR_IMAGE:-localhost/hpresilience-testcluster:latest}"
    assert slurm["environment"]["HPR_NODES"] == "${HPR_NODES:-4}"
    assert (COMPOSE.parent / slurm["build"]["context"]).resolve() == REPO
    assert (REPO / slurm["build"]["dockerfile"]).is_file()
    script = (REPO / "scripts" / "test-image").read_text()
    assert "export HPR_IMAGE=$image HPR_NODES=4" in script and 'project=hpr-test-image-$run_id' in script
