"""Credentials in a tracking URI: split off for MLflow's basic-auth variables, or redacted."""

from __future__ import annotations

import pytest

from study.options import redact_uri, split_credentials


@pytest.mark.parametrize(("uri", "clean", "credentials"), [
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000", {}),
    ("sqlite:////tmp/m.db", "sqlite:////tmp/m.db", {}),
    ("https://bob:p%40ss@mlflow.example:443/base", "https://mlflow.example:443/base",
     {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "p@ss"}),
    ("http://bob@host:80", "http://host:80", {"MLFLOW_TRACKING_USERNAME": "bob"}),
])
def test_split_credentials(uri: str, clean: str, credentials: dict[str, str]) -> None:
    assert split_credentials(uri) == (clean, credentials)


def test_redact_uri_hides_only_the_password() -> None:
    assert redact_uri("http://bob:s3cret@h:1/x") == "http://bob:***@h:1/x"
    assert redact_uri("http://bob@h:1") == "http://bob@h:1"
    assert redact_uri("sqlite:////a/b.db") == "sqlite:////a/b.db"
