"""Compares the runtime stage of deploy/Dockerfile with an image's config.

    python3 deploy/image/compare.py DOCKERFILE INSPECT_JSON

INSPECT_JSON is `buildah inspect --type image` output. Checks USER, EXPOSE,
STOPSIGNAL, ENTRYPOINT, CMD (OCI and Docker configs alike) and HEALTHCHECK
(Docker config only: OCI has no health check). Prints one line per field;
exits 1 if any differs.
"""
import json
import re
import sys


def instructions(path):
    """The runtime stage (after the last FROM) as (KEYWORD, argument) pairs."""
    logical, joined = [], ""
    for raw in open(path, encoding="utf-8"):
        line = raw.rstrip("\n")
        if not joined and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        joined += line
        if joined.strip():
            logical.append(joined.strip())
        joined = ""
    stage = []
    for line in logical:
        word, _, arg = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stage = []
        else:
            stage.append((word, arg.strip()))
    return stage


def exec_form(arg, what):
    value = json.loads(arg)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise SystemExit(f"{what} is not in exec (JSON array) form: {arg}")
    return value


UNITS = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def duration(text):
    total, rest = 0, text
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", text):
        total += int(float(number) * UNITS[unit])
        rest = rest.replace(number + unit, "", 1)
    if rest:
        raise SystemExit(f"bad duration {text!r}")
    return total


def healthcheck(arg):
    options = {}
    while arg.startswith("--"):
        option, _, arg = arg.partition(" ")
        name, _, value = option[2:].partition("=")
        options[name] = value
        arg = arg.strip()
    kind, _, command = arg.partition(" ")
    if kind.upper() == "NONE":
        return {"Test": ["NONE"]}
    if kind.upper() != "CMD":
        raise SystemExit(f"HEALTHCHECK: expected CMD, got {arg}")
    check = {"Test": ["CMD"] + exec_form(command.strip(), "HEALTHCHECK CMD")}
    for name, field in [("interval", "Interval"), ("timeout", "Timeout"),
                        ("start-period", "StartPeriod")]:
        if name in options:
            check[field] = duration(options[name])
    if "retries" in options:
        check["Retries"] = int(options["retries"])
    return check


def port(text):
    return text if "/" in text else text + "/tcp"


def main():
    dockerfile, inspect = sys.argv[1], sys.argv[2]
    want = {}
    for word, arg in instructions(dockerfile):
        if word == "USER":
            want["User"] = arg
        elif word == "EXPOSE":
            want.setdefault("ExposedPorts", set()).update(port(p) for p in arg.split())
        elif word == "STOPSIGNAL":
            want["StopSignal"] = arg
        elif word == "ENTRYPOINT":
            want["Entrypoint"] = exec_form(arg, "ENTRYPOINT")
        elif word == "CMD":
            want["Cmd"] = exec_form(arg, "CMD")
        elif word == "HEALTHCHECK":
            want["Healthcheck"] = healthcheck(arg)
    for field in ["User", "ExposedPorts", "StopSignal", "Entrypoint", "Cmd", "Healthcheck"]:
        if field not in want:
            raise SystemExit(f"{dockerfile}: the runtime stage sets no {field}")

    image = json.load(open(inspect, encoding="utf-8"))
    configs = {"OCIv1": image["OCIv1"]["config"], "Docker": image["Docker"]["config"]}
    failed = False
    for field, expected in want.items():
        for name, config in configs.items():
            if field == "Healthcheck" and name == "OCIv1":
                continue
            got = config.get(field)
            if field == "ExposedPorts":
                got = {port(p) for p in (got or {})}
            elif field == "Healthcheck" and got is not None:
                got = {k: v for k, v in got.items() if v not in (0, None) or k == "Test"}
            ok = got == expected
            failed |= not ok
            show = sorted(expected) if isinstance(expected, set) else expected
            print(f"{'ok  ' if ok else 'DIFF'} {name}.{field}: {json.dumps(show)}"
                  + ("" if ok else f"  image: {json.dumps(sorted(got) if isinstance(got, set) else got)}"))
    sys.exit(1 if failed else 0)


main()
