"""Settings are read where the docs say, and a change is seen at once.

Tasks read their settings for every message, from a cache of Celery's
configuration maps: these tests change the configuration every way Celery
allows after a first read, and expect the new value at the next.
"""

from __future__ import annotations

import os

import pytest
from celery import Celery

from tenant_celery import config
from tenant_celery.config import DEFAULT_HEADER, header_name, setting


def _app() -> Celery:
    app = Celery("config-test", set_as_current=False)
    app.finalize()
    return app


def test_a_value_set_after_the_first_read_is_seen() -> None:
    app = _app()
    assert header_name(app) == DEFAULT_HEADER
    app.conf.tenant_celery_header = "org"
    assert header_name(app) == "org"
    app.conf.tenant_celery_header = "account"  # a changed value, not a new key
    assert header_name(app) == "account"
    del app.conf.changes["tenant_celery_header"]
    assert header_name(app) == DEFAULT_HEADER


def test_configuration_sources_and_added_defaults() -> None:
    class Source:
        tenant_celery_header = "from_source"

    app = Celery("config-test", set_as_current=False)
    app.config_from_object(Source)
    assert header_name(app) == "from_source"
    app.conf.add_defaults({"tenant_celery_guc": "app.tenant"})
    assert setting(app, "guc") == "app.tenant"
    app.conf.update(tenant_celery_header="updated")
    assert header_name(app) == "updated"


def test_namespaced_configuration() -> None:
    class Source:
        CELERY_TENANT_CELERY_HEADER = "namespaced"

    app = Celery("config-test", set_as_current=False)
    app.config_from_object(Source, namespace="CELERY")
    assert header_name(app) == "namespaced"


def test_environment_when_the_app_says_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    app = _app()
    assert setting(app, "guc", "d.d") == "d.d"
    monkeypatch.setenv("TENANT_CELERY_GUC", "env.guc")
    assert setting(app, "guc", "d.d") == "env.guc"
    app.conf.tenant_celery_guc = "conf.guc"
    assert setting(app, "guc", "d.d") == "conf.guc"


def test_current_app_proxy() -> None:
    from celery import current_app  # noqa: PLC0415

    previous = current_app._get_current_object()
    app = Celery("config-test-current", set_as_current=False)
    app.conf.tenant_celery_guc = "current.app"
    app.set_current()
    try:
        assert setting(current_app, "guc") == "current.app"
    finally:
        previous.set_current()
    assert setting(current_app, "guc") != "current.app"


def test_the_environment_is_read_as_os_environ_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "TENANT_CELERY_TEST_ENVIRON_READ"
    monkeypatch.delenv(name, raising=False)
    assert config._environ(name) is None
    for value in ("x", "", "éü", "a b\tc"):
        monkeypatch.setenv(name, value)
        assert config._environ(name) == os.environ.get(name) == value
    monkeypatch.delenv(name)
    assert config._environ(name) is None
    # A setting read through it sees the change at once (nothing is cached).
    monkeypatch.setenv("TENANT_CELERY_HEADER", "org")
    assert config.header_name(None) == "org"
    monkeypatch.delenv("TENANT_CELERY_HEADER")
    assert config.header_name(None) == config.DEFAULT_HEADER
