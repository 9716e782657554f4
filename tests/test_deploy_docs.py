"""docs/deploy.md describes every service setting and shows the deployment's commands."""

from __future__ import annotations

import re

from support.deploy import DOCS


def test_deploy_docs_list_every_setting():
    from service.config import ServiceSettings, _env_name

    text = DOCS.read_text()
    service_table = text.split("### Service settings", 1)[1].split("###", 1)[0]
    table = set(re.findall(r"^\|\s*`(SOAP_[A-Z_]+)`", service_table, flags=re.M))
    settings = {_env_name(f) for f in ServiceSettings.model_fields}
    assert settings - table == set(), f"docs/deploy.md does not describe {sorted(settings - table)}"
    assert table - settings <= {"SOAP_API_KEY"}, f"docs/deploy.md describes unknown {sorted(table - settings)}"
    for command in (
        "docker compose up",
        "docker/compose.cpu.yml",
        "--profile scale",
        "--profile gpu-metrics",
        "kubectl apply -k deploy/k8s",
        "nvidia-ctk",
    ):
        assert command in text, f"docs/deploy.md does not show {command!r}"
