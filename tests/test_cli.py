"""`chat-server check-config` as an operator runs it."""

from __future__ import annotations

from tests.support.servers import chat_server


def run(env: dict[str, str]):
    return chat_server("check-config", env=env, timeout=60)


def test_check_config_ok_with_sqlite(tmp_path):
    result = run({"CHAT_ENV": "development", "SQLITE_PATH": str(tmp_path / "c.db")})
    assert result.returncode == 0, result.stderr
    assert "store      ok (sqlite)" in result.stdout


def test_check_config_ok_with_redis(tmp_path, redis_url):
    result = run(
        {"CHAT_ENV": "development", "SQLITE_PATH": str(tmp_path / "c.db"), "REDIS_URL": redis_url}
    )
    assert result.returncode == 0, result.stderr
    assert "redis      ok" in result.stdout


def test_check_config_reports_unreachable_redis(tmp_path):
    result = run(
        {
            "CHAT_ENV": "development",
            "SQLITE_PATH": str(tmp_path / "c.db"),
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": "1",
            "REDIS_TIMEOUT": "1",
        }
    )
    assert result.returncode == 1
    assert "PROBLEM    redis:" in result.stderr


def test_check_config_rejects_bad_settings():
    result = run({"CHAT_ENV": "production", "JWT_SECRET": "short"})
    assert result.returncode == 2
    assert "JWT_SECRET must be at least 32 characters in production" in result.stderr
    bad_port = run({"CHAT_ENV": "development", "PORT": "99999"})
    assert bad_port.returncode == 2 and "PORT" in bad_port.stderr


def test_check_config_wants_a_sentinel_service_name():
    result = run({"CHAT_ENV": "development", "REDIS_URL": "redis+sentinel://127.0.0.1:26379/0"})
    assert result.returncode == 2
    assert "a Sentinel URL needs the database and the service name" in result.stderr
