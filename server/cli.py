"""Operator commands: ``chat-server check-config`` and ``chat-server verify URL...``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from server.config import ConfigError, Settings, load_settings


async def _check_backends(settings: Settings) -> list[str]:
    from server.factories import build_store

    problems: list[str] = []
    store = build_store(settings)
    try:
        await asyncio.wait_for(store.start(), settings.STORE_TIMEOUT * 2)
        await asyncio.wait_for(store.ping(), settings.STORE_TIMEOUT)
        print(f"store      ok ({settings.STORE})")
    except Exception as exc:
        problems.append(f"store ({settings.STORE}): {exc or type(exc).__name__}")
    finally:
        try:
            await store.close()
        except Exception:
            pass
    if settings.redis_configured:
        from server.bus.connection import create_redis
        from server.factories import redis_config

        redis = create_redis(redis_config(settings))
        try:
            await asyncio.wait_for(redis.ping(), settings.REDIS_TIMEOUT)
            mode = "cluster" if settings.REDIS_CLUSTER else "standalone/sentinel"
            print(f"redis      ok ({mode})")
        except Exception as exc:
            problems.append(f"redis: {exc or type(exc).__name__}")
        finally:
            await redis.aclose()
    else:
        print("redis      not configured: single instance, in-process rooms and presence")
    return problems


def check_config() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"configuration invalid: {exc}", file=sys.stderr)
        return 2
    print(f"environment {settings.env}")
    print(f"instance   {settings.instance_id}")
    print(
        f"auth       {','.join(settings.JWT_ALGORITHMS)}"
        + (f" via JWKS {settings.JWT_JWKS_URL}" if settings.JWT_JWKS_URL else "")
    )
    print(f"dev tokens {'on' if settings.DEV_TOKENS else 'off'}")
    problems = asyncio.run(_check_backends(settings))
    for problem in problems:
        print(f"PROBLEM    {problem}", file=sys.stderr)
    return 1 if problems else 0


def verify(urls: list[str], token_secret: str | None, token: str | None, timeout: float) -> int:
    from server.verify import Verifier

    if not (token_secret or token):
        print("verify needs --token-secret (to mint test tokens) or --token", file=sys.stderr)
        return 2
    verifier = Verifier(urls, token_secret, token, timeout)
    ok = asyncio.run(verifier.run())
    print(verifier.table())
    print(
        "deployment verified" if ok else "deployment NOT verified",
        file=sys.stdout if ok else sys.stderr,
    )
    return 0 if ok else 1


def api_key(name: str, writable: bool) -> int:
    from server.auth import new_api_key, parse_api_key_entry

    secret, entry = new_api_key(name, writable)
    try:
        parse_api_key_entry(entry)
    except ValueError as exc:
        print(f"bad key name: {exc}", file=sys.stderr)
        return 2
    print(f"key (give it to the backend; it is shown once): {secret}")
    print(f"entry (add it to SERVER_API_KEYS, comma-separated): {entry}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chat-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "check-config", help="validate settings and test Redis and store connectivity"
    )
    check = commands.add_parser("verify", help="check a running deployment end to end")
    check.add_argument("urls", nargs="+", help="instance URLs, or one load balancer URL")
    check.add_argument("--token-secret", help="HS256 secret to mint test users' tokens")
    check.add_argument("--token", help="a ready token (one test user for every connection)")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds per step (default 10)")
    key = commands.add_parser(
        "api-key", help="make a server API key and the SERVER_API_KEYS entry that admits it"
    )
    key.add_argument("name", help="a name for the key (labels metrics and logs)")
    key.add_argument("--read-only", action="store_true", help="GET routes and presence only")
    args = parser.parse_args(argv)
    if args.command == "api-key":
        return api_key(args.name, not args.read_only)
    if args.command == "check-config":
        return check_config()
    if args.command == "verify":
        return verify(args.urls, args.token_secret, args.token, args.timeout)
    return 2


if __name__ == "__main__":
    sys.exit(main())
