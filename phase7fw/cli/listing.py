"""``phase7fw plugins`` and ``phase7fw components``: what is installed and what it registers."""

from __future__ import annotations

import json

from phase7fw.cli.common import plugins
from phase7fw.errors import Phase7Error


def cmd_plugins(args) -> int:
    loaded = plugins()
    rows = loaded.describe()
    errors = [{"name": e.name, "dist": e.dist, "hook": e.hook, "error": e.reason} for e in loaded.load_errors]
    if args.json:
        print(json.dumps({"plugins": rows, "errors": errors}, indent=2))
        return 0
    for row in rows:
        kind = "built-in" if row["builtin"] else row["dist"]
        print(f"{row['name']} ({kind}, {row['version']}): {', '.join(row['components']) or '-'}")
    for err in loaded.load_errors:
        print(f"FAILED {err.name} ({err}), disabled")
    return 0


def cmd_components(args) -> int:
    from phase7fw.registry import KINDS

    registry = plugins().registry
    if args.kind and args.kind not in KINDS:
        raise Phase7Error(f"unknown kind {args.kind!r}; kinds are: {', '.join(KINDS)}")
    entries = registry.entries(args.kind)
    if args.json:
        print(json.dumps([{"kind": e.kind, "name": e.name, "plugin": e.plugin, "description": e.description,
                           "config": e.config_fields()} for e in entries], indent=2))
        return 0
    for e in entries:
        print(f"{e.kind}:{e.name}  [{e.plugin}]  {e.description}")
        for f in e.config_fields():
            print(f"    {f['name']}: {f['type']} = {f['default']}" + (f"  # {f['help']}" if f["help"] else ""))
    return 0


def add_plugins(sub) -> None:
    pl = sub.add_parser("plugins", help="list loaded plugins and what they register")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)


def add_components(sub) -> None:
    co = sub.add_parser("components", help="list registered components and their recipe options")
    co.add_argument("kind", nargs="?")
    co.add_argument("--json", action="store_true")
    co.set_defaults(func=cmd_components)
